"""The search loop: ask Optuna, predict memory, run the trial in a worker, tell Optuna, repeat.

One thread per worker process (one per GPU, or several on CPU) asks the shared study for trials,
so many workers and many hosts (through a shared storage URL) cooperate on one study.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import shutil
import socket
import threading
import time
import warnings
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import fluxtune.search.objective as obj
from fluxtune.errors import IncompatibleKnobsError, ProfileError, SearchError
from fluxtune.hardware import HardwareInfo, detect_hardware, library_versions
from fluxtune.profile import Profile
from fluxtune.search.space import SearchSpace
from fluxtune.search.study import HOME, create_or_resume, open_storage, study_dir
from fluxtune.units import format_bytes
from fluxtune.worker import (
    DEFAULT_SESSION,
    RunOutcome,
    RunRequest,
    ScanRequest,
    Status,
    Worker,
    WorkerDied,
    WorkerSpec,
)

SKIP_MARGIN = 1.15
"""Skip a trial without running it only when the memory model predicts 15 % over the budget."""


@dataclass
class SearchConfig:
    """Everything ``fluxtune search`` was asked for."""

    model: str
    base: Profile
    workload: dict[str, Any]
    budget_bytes: int | None
    objective: str = "latency"
    min_psnr: float | None = None
    max_latency: float | None = None
    images: int | None = None
    trials: int = 40
    timeout_s: float | None = None
    trial_timeout_s: float = 900.0
    patience: int | None = 15
    storage: str | None = None
    study: str = "fluxtune"
    devices: list[str] = field(default_factory=lambda: ["cpu"])
    dtype: str = "bfloat16"
    narrow: dict[str, Any] = field(default_factory=dict)
    seed: int | None = 0
    home: Path = HOME
    ram_budget_bytes: int | None = None
    floor_compiled: bool = False
    """Also measure the lossless profile compiled, so quality drops count against compile's own drift."""
    warm_start: bool = True
    """Enqueue the shipped presets' configurations first (off: the sampler alone, for an ablation)."""
    descent: bool = True
    """Try the incumbent's one-knob moves before sampling (:mod:`fluxtune.search.descent`)."""
    prune: bool = True
    """Stop a trial after its first warm steps when it projects clearly slower than the incumbent
    (:mod:`fluxtune.search.pruning`)."""
    prune_margin: float = 1.3
    """How much slower than the incumbent a trial's (lower-bound) projection must be to be pruned."""
    sensitivity: dict[str, list[str]] | str | None = None
    """Method -> ranked exclude patterns, ``"auto"`` (scan each int8/fp8 method in the first worker), or None."""
    retime_rounds: int = 2
    """Rounds of interleaved re-timing of the finalists and the baseline at the end (0: none)."""
    session: str = DEFAULT_SESSION
    """The workers' session class (``module:Class``); tests swap in one that crashes."""

    def identity(self) -> dict[str, Any]:
        return {
            "model": self.model, "budget_bytes": self.budget_bytes, "objective": self.objective,
            "workload": self.workload, "space": self.narrow, "min_psnr": self.min_psnr,
            "max_latency": self.max_latency, "images": self.images,
            "sensitivity": self.sensitivity if not isinstance(self.sensitivity, dict) else sorted(self.sensitivity),
        }


@dataclass
class SearchResult:
    study: Any
    best: Any | None
    reference: dict[str, Any]
    elapsed_s: float
    trials_run: int


_REFERENCE_FILES = ("reference.pt", "reference.json")
"""What a worker writes for the lossless reference (tensors, then the JSON sidecar)."""
_LEFT_AFTER_RESTORE_WARN = 64 << 20
"""Device memory still allocated after a restore that the search warns about (a few MiB of CUDA and
cuDNN workspaces stay by design)."""


def reference_profile(cfg: SearchConfig, predicted_fits: bool, resident: int | None = None) -> Profile:
    """Lossless and within the budget: bf16, full steps, no cache, no compile; streamed if needed.

    Streamed, ``resident`` bytes of transformer blocks stay on the GPU and the rest go through fluxtune's
    block streamer (FLUX.1-dev under 12 GB on the H200: ~10 s a call, against 15-16 s for diffusers'
    leaf-level group offload, which is the fallback, ``resident=None``)."""
    data = cfg.base.to_dict()
    for name in ("transformer", "text_encoder", "text_encoder_2", "vae"):
        data[name].update(quantize=None, layerwise_casting=None)
        data[name]["offload"] = {"mode": "none"}
    if not predicted_fits:
        for name in ("transformer", "text_encoder", "text_encoder_2"):
            data[name]["offload"] = {"mode": "group", "level": "leaf", "use_stream": True}
        if resident is not None:
            data["transformer"]["offload"] = {"mode": "partial", "resident": max(1, resident)}
            for name in ("text_encoder", "text_encoder_2"):
                data[name]["offload"] = {"mode": "partial", "resident_blocks": 0}
        data["vae"]["tiling"] = True
    data["cache"] = {"kind": "none"}
    data["compile"] = {"mode": "off"}
    data["name"] = "reference"
    from fluxtune.profile import validate_profile

    return validate_profile(data, source="reference")


class Search:
    """One ``fluxtune search`` run (which may resume an existing study)."""

    def __init__(self, cfg: SearchConfig, progress: Callable[[str], None] = print) -> None:
        self.cfg = cfg
        self.say = progress
        self.lock = threading.Lock()
        self._scan_local = threading.local()  # the worker of this thread's trial (lazy sensitivity scans)
        self.started = time.monotonic()
        self.hardware: HardwareInfo = detect_hardware()
        self.on_gpu = any(d.startswith("cuda") for d in cfg.devices)
        self.goal = obj.Goal(cfg.objective, cfg.budget_bytes if self.on_gpu else (cfg.budget_bytes or cfg.ram_budget_bytes),
                             cfg.min_psnr, cfg.max_latency, cfg.images, self.on_gpu)
        self.dir = study_dir(cfg.study, cfg.home)
        self.dir.mkdir(parents=True, exist_ok=True)
        self.ran = 0
        self.durations: list[float] = []
        self.pruner: Any = None
        self.stop_reason = ""
        self.interrupted = False

    # -- set-up ----------------------------------------------------------------------------------
    def _workers(self) -> list[Worker]:
        workers = []
        n_cpu = sum(1 for d in self.cfg.devices if d == "cpu")
        for dev in self.cfg.devices:
            # Several CPU workers share the cores: without a split each one runs as many threads as
            # there are cores, and oversubscribed CPU timings are noise.
            threads = max(1, (os.cpu_count() or 1) // n_cpu) if dev == "cpu" and n_cpu > 1 else None
            spec = WorkerSpec(model=self.cfg.model, device=dev, dtype=self.cfg.dtype, workload=self.cfg.workload,
                              budget_bytes=self.goal.budget_bytes if self.on_gpu else None, study_dir=str(self.dir),
                              threads=threads, session=self.cfg.session)
            self.say(f"starting worker on {dev} with {self.cfg.model} ...")
            workers.append(Worker(spec))
            self.say(f"  loaded in {workers[-1].info.load_s:.1f}s")
        return workers

    def _prediction(self, profile: Profile, calibrated: bool = True) -> Any | None:
        from fluxtune.memory import predict

        try:
            return predict(profile, self.facts, calibration=self.calibration if calibrated else None)
        except Exception:  # the model is advice: never let it stop a search
            return None

    def _predict(self, profile: Profile) -> int | None:
        """Predicted peak to hold against the budget: the whole process (allocator + CUDA context) on a GPU,
        host memory on CPU."""
        pred = self._prediction(profile)
        if pred is None:
            return None
        # On CPU the "device" is host memory: weights, activations and the process itself.
        return int(pred.peak_vram)

    def _fits(self, params: dict[str, Any]) -> bool:
        """Whether the memory model admits these parameters under the budget (True when it cannot tell)."""
        budget = self.goal.budget_bytes
        if budget is None:
            return True
        try:
            predicted = self._predict(self.space.profile(params))
        except Exception:  # a combination the profile refuses: not a start
            return False
        return predicted is None or predicted <= budget

    def run(self) -> SearchResult:
        import optuna

        from fluxtune.memory import Calibration, ModelFacts
        from fluxtune.search.recipes import shipped_presets, warm_start

        optuna.logging.set_verbosity(optuna.logging.WARNING)
        workers = self._workers()
        try:
            self.facts = ModelFacts.from_dict(workers[0].info.facts)
            cal_path = self.dir / "calibration.json"
            self.calibration = Calibration.load(cal_path) if cal_path.exists() else Calibration()
            hw = self.hardware if self.on_gpu else self.hardware.without_gpu()
            self.space = SearchSpace.create(hw, _family(self.facts), self.cfg.base, self.cfg.narrow,
                                            transformer_bytes=_block_bytes(self.facts))
            self._check_budget_reachable()  # before the study exists: a budget no trial can meet creates none
            storage = open_storage(self.cfg.storage, self.cfg.home)
            with warnings.catch_warnings():  # multivariate/group are "experimental": not the user's concern
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                # Another seed on every resume: the same seed would propose the configurations of the
                # first run again (the study's history differs, but TPE's start-up draws would not).
                done_before, others = _finished_in(storage, self.cfg.study)
                seed = None if self.cfg.seed is None else self.cfg.seed + 7919 * done_before
                if seed is not None and others:
                    # Another process is running this study now: the same seed would propose its trials.
                    seed += os.getpid()
                sampler = optuna.samplers.TPESampler(seed=seed, multivariate=True, group=True,
                                                     constant_liar=len(self.cfg.devices) > 1, n_startup_trials=8)
            config = {**self.cfg.identity(), "hardware": self.hardware.fingerprint(), "versions": library_versions(),
                      "devices": self.cfg.devices, "base": self.cfg.base.to_dict(exclude_defaults=True),
                      "dtype": self.cfg.dtype}
            from fluxtune.search.pruning import ProjectionPruner

            self.pruner = (ProjectionPruner(self.cfg.objective, self.cfg.max_latency, self.cfg.prune_margin)
                           if self.cfg.prune else None)
            study, resumed = create_or_resume(self.cfg.study, storage, config, sampler,
                                              self.pruner or optuna.pruners.NopPruner())
            self.study = study
            done = len([t for t in study.get_trials(deepcopy=False) if t.state.is_finished()])
            self.say(f"study {self.cfg.study!r} ({'resumed, ' + str(done) + ' trials done' if resumed else 'new'}) "
                     f"in {self.cfg.storage or self.cfg.home / 'journal.log'}")
            sensitivity = self._sensitivity(workers[0])
            if sensitivity:
                self.space = SearchSpace.create(hw, _family(self.facts), self.cfg.base, self.cfg.narrow,
                                                transformer_bytes=_block_bytes(self.facts), sensitivity=sensitivity)
            reference = self._reference(workers[0])
            if self.cfg.warm_start and not study.get_trials(deepcopy=False):  # new, or stopped before this point
                presets = shipped_presets(self.space.family, hw.capability)
                for label, params in warm_start(self.space, presets):
                    study.enqueue_trial(params, user_attrs={"source": label}, skip_if_exists=True)
            if self.cfg.descent and not [t for t in study.get_trials(deepcopy=False) if t.state.is_finished()]:
                from optuna.trial import TrialState

                from fluxtune.search.descent import plain_start

                # Structure before sampling: the lossless configuration at the largest batch and resident
                # share the memory model admits (first under --no-warm-start; a recipe already queued
                # with the same parameters keeps its label), then one-knob moves from the incumbent.
                start = plain_start(self.space, self._fits)
                # Optuna's skip_if_exists does not see waiting trials (their parameters are still fixed
                # params), and a recipe may leave out one-value dimensions (size "default"): compare here.
                fixed = {d.name for d in self.space.dims if d.categorical and len(d.choices) == 1}

                def key(params: dict[str, Any]) -> dict[str, Any]:
                    return {k: v for k, v in params.items() if k not in fixed}

                queued = [key(t.system_attrs.get("fixed_params") or {}) for t in study.get_trials(deepcopy=False)
                          if t.state == TrialState.WAITING]
                if start is not None and key(start[1]) not in queued:
                    study.enqueue_trial(start[1], user_attrs={"source": start[0]}, skip_if_exists=True)
            threads = [threading.Thread(target=self._loop, args=(w,), daemon=True) for w in workers]
            for th in threads:
                th.start()
            try:
                for th in threads:
                    while th.is_alive():
                        th.join(0.5)
            except KeyboardInterrupt:
                self._interrupt(workers, threads)
                raise
            if self.cfg.retime_rounds and not self.interrupted:
                self._retime(workers[0])
        finally:
            for w in workers:
                w.stop()
            with contextlib.suppress(Exception):
                self.calibration.save(self.dir / "calibration.json")
        from fluxtune.search.results import best_trial

        return SearchResult(study, best_trial(study), reference, time.monotonic() - self.started, self.ran)

    def _retime(self, worker: Worker) -> None:
        """Re-time the finalists and the baseline interleaved (:mod:`fluxtune.search.retime`)."""
        from optuna.trial import TrialState

        from fluxtune.search import retime

        finished = len(self.study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)))
        if retime.recorded_winner(self.study, finished) is not None:
            return  # a resumed search that ran nothing new: the rounds are already there
        finalists, baseline = retime.candidates(self.study, self.cfg.objective)
        every = finalists + ([baseline] if baseline is not None and baseline not in finalists else [])
        if len(every) < 2:
            return
        rounds = self.cfg.retime_rounds
        self.say(f"re-timing {len(every)} finalists interleaved, {rounds} rounds: "
                 + ", ".join(c.label for c in every))

        def one(c: retime.Candidate) -> float | None:
            t0 = time.monotonic()
            try:
                if not worker.proc.is_alive():  # its last trial crashed it
                    worker.restart()
                res = worker.run(RunRequest(c.profile, role="retime", trial=c.trial), self.cfg.trial_timeout_s)
            except WorkerDied as e:
                self.say(f"  {c.label}: {e}")
                return None
            value = retime.measured_value(res, self.cfg.objective)
            shown = f"{value:.3f}{'s' if self.cfg.objective == 'latency' else ' images/s'}" if value else str(res.status)
            self.say(f"  {c.label}: {shown} ({time.monotonic() - t0:.1f}s)")
            return value

        def time_left() -> float | None:
            if self.cfg.timeout_s is None:
                return None
            return self.cfg.timeout_s - (time.monotonic() - self.started)

        done = retime.run_rounds(every, rounds, one, self.say, time_left, self._typical_trial_s() or None)
        winner, line = retime.verdict(finalists, baseline, self.cfg.objective)
        self.say(line)
        retime.record(self.study, finalists, baseline, winner, line, done, finished)

    def _sensitivity(self, worker: Worker) -> Mapping[str, Sequence[str]]:
        """Ranked exclude patterns per quantization method: given, or (``auto``) scanned when a trial first
        keeps sensitive layers of that method, once per study, and kept in its folder (a resumed study
        reads them back instead of scanning again)."""
        from fluxtune.search.space import LazyRankings
        from fluxtune.sensitivity import METHODS, SensitivityResult

        if isinstance(self.cfg.sensitivity, dict):
            return dict(self.cfg.sensitivity)
        if self.cfg.sensitivity != "auto":
            return {}
        quant = next(d for d in self.space.dims if d.name == "transformer.quantize")
        methods = [m for m in METHODS if m in quant.choices]
        done = {}
        for method in methods:
            path = self.dir / f"sensitivity-{method}.json"
            if path.exists():
                scan = SensitivityResult.load(path)
                done[method] = list(scan.exclude_patterns(len(scan.groups)))
        self._scan_local.worker = worker
        return LazyRankings(methods, self._scan, done)

    def _scan(self, method: str) -> list[str]:
        """One sensitivity scan in the worker about to run the trial that asked for it."""
        import json

        from fluxtune.presets import write_atomic
        from fluxtune.sensitivity import SensitivityResult

        steps = min(10, self.cfg.base.generation.steps)
        self.say(f"sensitivity: a trial keeps {method}'s most sensitive layers: scanning {method} one layer group "
                 f"at a time ({steps} steps) ...")
        t0 = time.monotonic()
        res = self._scan_local.worker.scan(ScanRequest(method, steps), self.cfg.trial_timeout_s)
        if res.status != Status.OK or res.result is None:
            self.say(f"sensitivity: {method} scan failed ({res.error}); its trials keep no layers unquantized")
            return []
        path = self.dir / f"sensitivity-{method}.json"
        write_atomic(path, json.dumps(res.result, indent=2) + "\n")
        groups = res.result["groups"]
        self.say(f"sensitivity: {method}: {len(groups)} groups in {time.monotonic() - t0:.0f}s, "
                 f"most sensitive {', '.join(g['name'] for g in groups[:3])}")
        scan = SensitivityResult.load(path)
        return list(scan.exclude_patterns(len(scan.groups)))

    def _check_budget_reachable(self) -> None:
        """Refuse a budget below anything the space can do, naming the smallest predicted peak."""
        if self.goal.budget_bytes is None:
            return
        from fluxtune.memory import smallest_feasible_budget
        from fluxtune.search.recipes import RECIPES

        modes = ("sequential", "group", "partial") if self.on_gpu else ("none",)
        frugal = [dict(p, **{"transformer.offload": m}) for p in RECIPES.values() for m in modes]
        candidates = []
        for params in frugal:
            params.update({"transformer.resident_fraction": 0.05})
            if self.on_gpu:
                params["text_encoders.offload"] = "partial"
            try:
                candidates.append(self.space.profile(params))
            except Exception:
                continue
        if not candidates:
            return
        peak, _ = smallest_feasible_budget(self.facts, candidates, calibration=self.calibration)
        # peak_vram includes the CUDA context, which the budget charges (the budget is the card).
        peak_cap = peak
        if peak_cap > self.goal.budget_bytes * SKIP_MARGIN:
            raise ProfileError(
                f"--budget {format_bytes(self.goal.budget_bytes)} is below anything this model can run with: the "
                f"smallest peak the memory model predicts is {format_bytes(peak_cap)}; raise --budget to at least that"
            )

    def _reference(self, worker: Worker) -> dict[str, Any]:
        ref = self.study.user_attrs.get("fluxtune_reference")
        if ref and worker.info.reference:
            self.say(f"reference: reusing {self.dir / 'reference'} (noise floor PSNR "
                     f"{ref.get('noise_floor', {}).get('psnr', float('nan')):.1f} dB)")
            return dict(ref)
        predicted = self._predict(reference_profile(self.cfg, True))
        fits = predicted is None or self.goal.budget_bytes is None or predicted <= self.goal.budget_bytes
        profile = self._streamed_reference() if not fits else reference_profile(self.cfg, True)
        shared = self._shared_reference(profile)
        if (shared / "run.json").exists():
            # Another study (say, another budget) already ran this lossless run on this machine.
            ref = json.loads((shared / "run.json").read_text())
            for name in _REFERENCE_FILES:  # the tensors and their sidecar: workers load them lazily
                shutil.copyfile(shared / name, self.dir / name)
            self.study.set_user_attr("fluxtune_reference", ref)
            self.say(f"reference: reusing the same lossless run of an earlier study ({shared}): "
                     f"{ref.get('latency_s') or 0:.2f}s, noise floor PSNR "
                     f"{ref.get('noise_floor', {}).get('psnr', float('nan')):.1f} dB")
            return dict(ref)
        self.say(f"reference: lossless run ({'resident' if fits else 'streamed: the bf16 model exceeds the budget'}) ...")
        result = first = None
        leaf = reference_profile(self.cfg, False)  # the fallback: diffusers' leaf offload
        for w_profile in [profile] if profile == leaf else [profile, leaf]:
            result = worker.run(RunRequest(w_profile, role="reference"), self.cfg.trial_timeout_s)
            first = first or result
            if result.status == Status.OK:
                profile = w_profile
                break
            if result.status == Status.INVALID:
                break  # the profile itself (e.g. its generation) is refused: offloading would not change that
        assert result is not None and first is not None
        if result.status == Status.INVALID and first is not result:
            result = first  # the fallback cannot run here (offload on a CPU): what stopped the first run is the news
        if result.status == Status.INVALID:  # bad input (exit 2), not a failed search
            raise IncompatibleKnobsError(f"the search's base profile is refused by this model: {result.error}")
        if result.status != Status.OK or result.measurement is None:
            raise SearchError(f"the lossless reference could not run here ({result.status}: {result.error}); "
                              "raise --budget or lower --size")
        m = result.measurement
        ref = {"profile": profile.to_dict(exclude_defaults=True), "latency_s": m.latency_s,
               "images_per_call": m.images_per_call, "peak": obj.peak_of(m, self.on_gpu),
               "noise_floor": result.noise_floor or {}}
        if self.cfg.floor_compiled:
            compiled = profile.replace(compile={"mode": "regional"})
            self.say("reference: the same run compiled, for the compiled noise floor ...")
            cres = worker.run(RunRequest(compiled, role="compiled_floor"), self.cfg.trial_timeout_s)
            ref["compiled_floor"] = cres.compiled_floor or {}
            self.say(f"reference: compiled floor PSNR {ref['compiled_floor'].get('psnr', float('nan')):.1f} dB")
        self.study.set_user_attr("fluxtune_reference", ref)
        if all((self.dir / name).exists() for name in _REFERENCE_FILES):
            shared.mkdir(parents=True, exist_ok=True)
            for name in _REFERENCE_FILES:
                shutil.copyfile(self.dir / name, shared / name)
            (shared / "run.json.tmp").write_text(json.dumps(ref, default=str))
            (shared / "run.json.tmp").replace(shared / "run.json")  # written last: marks the folder whole
        self.say(f"reference: {m.latency_s or 0:.2f}s (the second, warm call), peak {format_bytes(ref['peak'] or 0)}, noise floor PSNR "
                 f"{ref['noise_floor'].get('psnr', float('nan')):.1f} dB")
        return ref

    def _streamed_reference(self) -> Profile:
        """The lossless reference when bf16 exceeds the budget: the most transformer blocks resident that
        the memory model fits (with margin) under the budget, on the GPU and on the host; else diffusers'
        leaf-level group offload."""
        from fluxtune.memory import check_host_ram

        budget = self.goal.budget_bytes
        if budget is not None and self.on_gpu:
            for share in (0.5, 0.35, 0.2, 0.05):
                candidate = reference_profile(self.cfg, False, resident=int(share * budget))
                pred = self._prediction(candidate)
                if pred is not None and pred.peak_vram <= budget * 0.9 and check_host_ram(
                        pred, candidate.budget.host_ram or self._host_budget()) is None:
                    return candidate
        return reference_profile(self.cfg, False)

    def _host_budget(self) -> int | None:
        from fluxtune.memory import default_host_budget

        total = self.hardware.host_ram_bytes
        return default_host_budget(total) if total else None

    def _shared_reference(self, profile: Profile) -> Path:
        """Where the lossless run of this model, workload and reference profile on this machine and
        library versions is kept for every study in ``home`` (the 8 GB and 24 GB FLUX searches share
        one: 1.2 minutes each on the H200)."""
        versions = {k: v for k, v in library_versions().items() if k in ("torch", "diffusers", "transformers", "torchao")}
        knobs = {k: v for k, v in profile.to_dict(exclude_defaults=True).items() if k != "budget"}  # the run's, not the cap
        key = {"model": self.cfg.model, "workload": self.cfg.workload, "profile": knobs,
               "hardware": self.hardware.fingerprint(), "versions": versions, "compiled_floor": self.cfg.floor_compiled}
        local = Path(self.cfg.model)
        if local.is_dir():  # a checkpoint folder: its files may change under the same name
            key["files"] = sorted((str(f.relative_to(local)), f.stat().st_size, f.stat().st_mtime_ns)
                                  for f in local.rglob("*") if f.is_file())
        digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()[:16]
        return self.cfg.home / "references" / digest

    # -- the loop --------------------------------------------------------------------------------
    def _finished(self) -> int:
        return len([t for t in self.study.get_trials(deepcopy=False) if t.state.is_finished()])

    def _started(self) -> int:
        """Finished trials plus those running (here, in another worker or on another host): counting
        only finished ones lets every worker ask for one more and overshoot ``--trials``."""
        from optuna.trial import TrialState

        return len([t for t in self.study.get_trials(deepcopy=False) if t.state != TrialState.WAITING])

    def _should_stop(self) -> bool:
        if self.stop_reason:
            return True
        if self._started() >= self.cfg.trials:
            self.stop_reason = f"reached {self.cfg.trials} trials"
        elif self.cfg.timeout_s is not None and time.monotonic() - self.started + self._typical_trial_s() > self.cfg.timeout_s:
            self.stop_reason = f"reached the time limit ({self.cfg.timeout_s:.0f}s; a typical trial would overrun it)"
        elif self.cfg.patience and self._stale() >= self.cfg.patience:
            self.stop_reason = f"no improvement in the last {self.cfg.patience} trials"
        return bool(self.stop_reason)

    def _run_timeout(self) -> float:
        """How long a trial may run: ``trial_timeout_s``, and under ``--timeout`` no longer than the time
        left plus a grace (a typical trial, at least a minute). A trial that stalls near the end (seen on
        the H200: group offload under regional compile hit dynamo's recompile limit) is abandoned, so the
        search still ends near its limit and writes its results."""
        if self.cfg.timeout_s is None:
            return self.cfg.trial_timeout_s
        left = self.cfg.timeout_s - (time.monotonic() - self.started)
        return max(1.0, min(self.cfg.trial_timeout_s, left + max(60.0, self._typical_trial_s())))

    def _past_deadline(self) -> bool:
        return self.cfg.timeout_s is not None and time.monotonic() - self.started > self.cfg.timeout_s

    def _typical_trial_s(self) -> float:
        """Median wall time of the trials that ran here, so the last one started still ends in time."""
        import statistics

        return statistics.median(self.durations) if self.durations else 0.0

    def _stale(self) -> int:
        from fluxtune.search.results import best_so_far

        curve = best_so_far(self.study)
        if not curve or curve[-1][1] is None:
            return 0
        last = curve[-1][1]
        first_at = next(n for n, v in curve if v == last)
        return curve[-1][0] - first_at

    def _descend(self) -> None:
        """Queue the incumbent's next untried one-knob move (:mod:`fluxtune.search.descent`) when nothing
        else is queued (the warm start goes first); once none is left, the sampler proposes."""
        from optuna.trial import TrialState

        from fluxtune.search.descent import incumbent, last_moved, next_move

        if not self.cfg.descent:
            return
        trials = self.study.get_trials(deepcopy=False)
        if any(t.state == TrialState.WAITING for t in trials):
            return
        current = incumbent(self.study)
        if current is None:
            return
        after = last_moved([str(t.user_attrs.get("source", "")) for t in sorted(trials, key=lambda t: t.number)])
        move = next_move(self.space, current, [dict(t.params) for t in trials], self._fits, after)
        if move is not None:
            label, params = move
            self.study.enqueue_trial(params, user_attrs={"source": label})

    def _interrupt(self, workers: list[Worker], threads: list[threading.Thread]) -> None:
        """Ctrl-C: no trial starts after it; the ones in flight are abandoned (their workers stopped,
        each recorded once as FAIL with status interrupted), and every loop has ended when this returns,
        so the study the caller reports on no longer changes. Re-running continues the budget."""
        with self.lock:
            self.interrupted = True
            self.stop_reason = "interrupted (Ctrl-C)"
        self.say("interrupted: abandoning the trial(s) in flight; the finished ones are kept")
        for w in workers:
            with contextlib.suppress(Exception):
                w.abandon()
        for th in threads:
            th.join(30)

    def _loop(self, worker: Worker) -> None:
        from optuna.storages._heartbeat import get_heartbeat_thread
        from optuna.trial import TrialState

        while True:
            with self.lock:
                if self._should_stop():
                    return
                self._descend()
                trial = self.study.ask()
                # At once, so that a rerun after a kill can tell this trial's process is gone.
                trial.set_user_attr("host_pid", f"{socket.gethostname()}:{os.getpid()}")
            try:
                # Heartbeats (RDB storages) let other hosts fail this trial if this process dies.
                with get_heartbeat_thread(trial._trial_id, self.study._storage):
                    self._one(worker, trial)
            except WorkerDied as e:
                if self.interrupted:  # stopped by _interrupt: not a crash, and no new worker
                    trial.set_user_attr("status", "interrupted")
                    self.study.tell(trial, state=TrialState.FAIL)
                    return
                if e.timed_out and self._past_deadline():
                    # Abandoned at the search's time limit: not the configuration's fault, so it is not
                    # recorded as a result (a rerun may try it again), and no new worker starts.
                    trial.set_user_attr("status", "abandoned")
                    trial.set_user_attr("error", "abandoned at the search's time limit")
                    self.study.tell(trial, state=TrialState.FAIL)
                    with self.lock:
                        self.stop_reason = (f"reached the time limit ({self.cfg.timeout_s:.0f}s); trial "
                                            f"{trial.number + 1} was still running and was abandoned")
                    self.say(f"trial {trial.number + 1}: still running past the time limit: abandoned")
                    return
                trial.set_user_attr("status", Status.CRASHED.value)
                trial.set_user_attr("error", str(e))
                self.study.tell(trial, state=TrialState.FAIL)
                self.say(f"trial {trial.number + 1}: {e}; starting a new worker")
                try:
                    worker.restart()
                except SearchError as e2:
                    self.stop_reason = str(e2)
                    return
            except Exception as e:
                if self.interrupted:  # the abandoned worker's pipe broke under it (EOF, BrokenPipe): the same stop
                    trial.set_user_attr("status", "interrupted")
                    self.study.tell(trial, state=TrialState.FAIL)
                    return
                trial.set_user_attr("status", Status.ERROR.value)
                trial.set_user_attr("error", f"{type(e).__name__}: {e}")
                self.study.tell(trial, state=TrialState.FAIL)
                self.say(f"trial {trial.number + 1}: failed in the search loop: {type(e).__name__}: {e}")

    def _one(self, worker: Worker, trial: Any) -> None:
        import optuna

        self._scan_local.worker = worker  # a scan the trial's profile needs runs here, before the trial
        profile = self.space.suggest(trial)
        desc = self.space.describe(trial.params)
        trial.set_user_attr("profile", profile.to_dict(exclude_defaults=True))
        trial.set_user_attr("config", desc)
        if self._repeat(trial, desc):
            return
        pred = self._prediction(profile)
        predicted = None if pred is None else int(pred.peak_vram)
        trial.set_user_attr("predicted_peak", predicted)
        if pred is not None and self.on_gpu:
            # What the program needs, compared with torch's allocated peak (a capped allocator reserves
            # up to the cap whatever the need, so reserved is the budget check, not the model's test).
            trial.set_user_attr("predicted_allocated", int(pred.peak_allocated))
        n = trial.number
        total = self.cfg.trials
        if self.goal.budget_bytes is not None and predicted is not None and predicted > self.goal.budget_bytes * SKIP_MARGIN:
            sc = obj.predicted_infeasible(self.goal, predicted)
            self._tell(trial, sc, RunOutcome(Status.SKIPPED, error=f"predicted peak {format_bytes(predicted)} > budget"))
            self.say(f"[{n + 1}/{total}] {desc} | skipped: predicted {format_bytes(predicted)} > "
                     f"{format_bytes(self.goal.budget_bytes)}")
            return
        self.say(f"[{n + 1}/{total}] running on {worker.spec.device}: {desc}")
        images = profile.generation.images_per_prompt
        trial.set_user_attr("images_per_call", images)
        # A cache computes every block in its first steps and skips later, so a projection from the first
        # warm steps is no lower bound for it: on a busy CPU the first-block cache, the winner beyond noise,
        # was pruned at 4x the plain model's latency. Such trials run in full.
        cached = profile.cache.kind != "none"
        limit = None if self.pruner is None or cached else self.pruner.threshold(self.study, images)
        t0 = time.monotonic()
        result = worker.run(RunRequest(profile, trial=n, prune_above_s=limit), self._run_timeout())
        self.durations.append(time.monotonic() - t0)
        trial.set_user_attr("wall_s", round(time.monotonic() - t0, 2))
        self.ran += 1
        self._check_restore(n, result)
        status = result.status
        if status == Status.PRUNED and result.measurement is not None:
            from fluxtune.search.pruning import PROBE_STEPS

            # Through Optuna's pruner API: the projection is the trial's intermediate value.
            trial.report(float(result.measurement.projected_latency_s or 0.0), PROBE_STEPS)
            trial.set_user_attr("status", status.value)
            trial.set_user_attr("error", result.error)
            trial.set_user_attr("measurement", result.measurement_data())
            trial.set_user_attr("pruned_by_study", trial.should_prune())
            self.study.tell(trial, state=optuna.trial.TrialState.PRUNED)
            self.say(f"[{n + 1}/{total}] {desc} | {result.error or 'pruned'} ({time.monotonic() - t0:.1f}s)")
            return
        if status in (Status.INVALID, Status.ERROR):
            trial.set_user_attr("status", status.value)
            trial.set_user_attr("error", result.error)
            self.study.tell(trial, state=optuna.trial.TrialState.FAIL)
            self.say(f"[{n + 1}/{total}] {desc} | {status}: {result.error}")
            return
        sc = obj.score(self.goal, result)
        m = result.measurement
        if status == Status.OK and self.on_gpu and m is not None and m.peak_allocated:
            # Learn from the allocated peak: under a cap the allocator reserves up to the cap whatever
            # the need (H200: leaf offload reserved 4.5 GB for 2.1 GB allocated), which inflates ratios.
            raw = self._prediction(profile, calibrated=False)
            if raw is not None:
                self.calibration.add(raw, m.peak_allocated, kind="allocated")
        self._tell(trial, sc, result)
        self.say(self._line(n, desc, sc, result))

    def _check_restore(self, n: int, result: RunOutcome) -> None:
        """Say so when the worker's switch to pristine weights left device memory allocated."""
        held, left = result.timings.held_after_restore, result.timings.left_after_restore
        # The old modules' tensors are freed even when something still refers to the modules (``held``):
        # only memory still allocated costs the next trial.
        if left is not None and left >= _LEFT_AFTER_RESTORE_WARN:
            who = f" (still referenced: {', '.join(held)})" if held else ""
            self.say(f"[{n + 1}/{self.cfg.trials}] warning: {format_bytes(left)} stayed allocated on the device when the "
                     f"worker restored pristine weights{who}; this trial had that much less memory "
                     "(a fluxtune bug: please report it with this log)")

    def _repeat(self, trial: Any, desc: str) -> bool:
        """A configuration this study already measured (same profile; a study has one workload) gets that
        result again instead of another run: the sampler may propose it twice, a resume or a second
        process may too. One that an earlier trial is running right now (another worker or process) is
        waited for (only for a lower trial number, so two never wait for each other). Returns whether
        ``trial`` was told such a result."""
        from optuna.trial import TrialState

        from fluxtune.search.study import running_elsewhere

        def key(t: Any) -> str:
            return json.dumps(t.user_attrs.get("profile"), sort_keys=True, default=str)

        mine = key(trial)
        deadline = time.monotonic() + self.cfg.trial_timeout_s
        waiting = False
        while True:
            trials = self.study.get_trials(deepcopy=False)
            prev = next((t for t in trials if t.state in (TrialState.COMPLETE, TrialState.PRUNED) and t.number != trial.number
                         and t.user_attrs.get("duplicate_of") is None and key(t) == mine), None)
            if prev is not None:
                break
            running = [t for t in trials if t.state == TrialState.RUNNING and t.number < trial.number
                       and key(t) == mine and running_elsewhere(t)]
            if not running or self.interrupted or time.monotonic() > deadline:
                return False
            if not waiting:
                self.say(f"[{trial.number + 1}/{self.cfg.trials}] {desc} | trial {running[0].number + 1} is running "
                         "this configuration: waiting for its result")
                waiting = True
            time.sleep(1.0)
        for k, value in (prev.user_attrs.get("constraints") or {}).items():
            trial.set_constraint(k, value)
        for k, value in prev.user_attrs.items():
            if k not in ("profile", "config", "host_pid", "source"):
                trial.set_user_attr(k, value)
        trial.set_user_attr("duplicate_of", prev.number)
        if prev.state == TrialState.PRUNED:
            for step, value in prev.intermediate_values.items():
                trial.report(value, step)
            self.study.tell(trial, state=TrialState.PRUNED)
        else:
            self.study.tell(trial, prev.values)
        self.say(f"[{trial.number + 1}/{self.cfg.trials}] {desc} | the configuration of trial {prev.number + 1}: "
                 "its result, not run again")
        return True

    def _tell(self, trial: Any, sc: obj.Score, result: RunOutcome) -> None:
        for key, value in sc.constraints.items():
            trial.set_constraint(key, value)
        # The keys studies have always had: a study written before still resumes and reports.
        attrs = {"status": result.status.value, "error": result.error, "constraints": sc.constraints,
                 "latency_s": sc.latency, "throughput": sc.throughput, "peak": sc.peak, "quality": result.quality,
                 "measurement": result.measurement_data(), "apply_s": result.timings.apply_s,
                 "hardware": self.hardware.fingerprint()}
        for k, v in attrs.items():
            if v is not None:
                trial.set_user_attr(k, v)
        self.study.tell(trial, sc.values)

    def _line(self, n: int, desc: str, sc: obj.Score, result: RunOutcome) -> str:
        from fluxtune.search.results import best_trial

        status, m = result.status, result.measurement
        bits = [f"[{n + 1}/{self.cfg.trials}] {desc}"]
        if status == Status.OK and m is not None:
            lat = f"{sc.latency:.2f}s" if sc.latency is not None else "?"
            first = m.first_call_s
            bits.append(f"{lat}" + (f" (first {first:.1f}s)" if first and sc.latency and first > 1.5 * sc.latency else ""))
            if self.goal.objective == "throughput" and sc.throughput:
                bits.append(f"{sc.throughput:.2f} img/s (batch {m.images_per_call})")
            bits.append(f"peak {format_bytes(sc.peak or 0)}")
            if sc.psnr is not None:
                bits.append(f"PSNR {min(sc.psnr, 100):.1f}")
            if not sc.feasible:
                bits.append("infeasible (" + ", ".join(k for k, v in sc.constraints.items() if v > 0) + ")")
        else:
            bits.append(f"{status}: {str(result.error or '')[:80]}")
        best = best_trial(self.study)
        if best is not None and self.goal.objective == "throughput":
            bits.append(f"best #{best.number + 1} {best.user_attrs.get('throughput') or 0:.2f} img/s")
        elif best is not None:
            bits.append(f"best #{best.number + 1} {best.user_attrs.get('latency_s', 0):.2f}s")
        elapsed = time.monotonic() - self.started
        done = max(1, self._finished())
        left = (self.cfg.trials - done) * elapsed / done
        if self.cfg.timeout_s:
            left = min(left, self.cfg.timeout_s - elapsed)
        bits.append(f"{elapsed / 60:.1f}m elapsed, ~{max(0.0, left) / 60:.1f}m left")
        return " | ".join(bits)


def _finished_in(storage: Any, name: str) -> tuple[int, bool]:
    """Finished trials of study ``name`` in ``storage`` (0 when it does not exist yet), and whether some
    are running in another process now."""
    import optuna
    from optuna.trial import TrialState

    try:
        study = optuna.load_study(study_name=name, storage=storage)
    except KeyError:
        return 0, False
    trials = study.get_trials(deepcopy=False)
    mine = f"{socket.gethostname()}:{os.getpid()}"
    others = any(t.state == TrialState.RUNNING and t.user_attrs.get("host_pid") not in (None, mine) for t in trials)
    return sum(1 for t in trials if t.state.is_finished()), others


def _family(facts: Any) -> str:
    return str(getattr(facts, "family", None) or "flux")


def _block_bytes(facts: Any) -> int | None:
    """Bytes of the transformer's repeated blocks as loaded (what partial residency divides)."""
    t = facts.components.get("transformer")
    return int(t.block_params * t.dtype_bytes) if t is not None else None

