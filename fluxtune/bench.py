"""``fluxtune bench``: profiles side by side with the plain diffusers recipes, same workload, same caps.

Each candidate runs in its own worker process (a fresh CUDA context and allocator) under a memory cap;
a recipe that does not fit is shown as such, not dropped. The first candidate measured is the bf16
reference that quality is computed against.

Several budgets in one run: each profile runs under its own budget, and each recipe climbs the
budgets from the smallest until one fits (a recipe's memory does not depend on the cap, so a recipe
that fits 8 GB fits 12 GB too, and is measured once). A cap that a recipe's weights alone exceed is
recorded as ``no_fit`` without running it (the memory model's weight floor, no activations). Rows are
written after every candidate; re-running the same command resumes, keeping what was measured.
"""

from __future__ import annotations

import hashlib
import json
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fluxtune.profile import COMPONENTS, Profile, validate_profile
from fluxtune.status import Status
from fluxtune.units import format_bytes, format_seconds

if TYPE_CHECKING:
    from fluxtune.worker import RunOutcome
    from fluxtune.worker.protocol import Progress

GB = 1e9
Cap = int | None
"""A memory cap in bytes; None = no cap."""

FINAL = (Status.OK, Status.INVALID, Status.ERROR, Status.OOM, Status.OVER_BUDGET, Status.NO_FIT)
"""Statuses a resumed bench keeps; the others (crashed, timeout) run again (their rows keep what the worker
had measured before it was stopped: ``extra["progress"]``, ``extra["partial_latency_runs"]``)."""

MIN_START_S = 60.0
"""Under --timeout, a candidate starts only with at least this much time left."""


def _all(mode: dict[str, Any], *, vae: dict[str, Any] | None = None) -> dict[str, Any]:
    out = {name: {"offload": dict(mode)} for name in COMPONENTS}
    if vae is not None:
        out["vae"] = {"offload": vae}
    return out


def recipes(family: str) -> dict[str, dict[str, Any]]:
    """The diffusers one-liners, as fluxtune profiles (what a user would write by hand)."""
    leaf = {"mode": "group", "level": "leaf", "use_stream": True}
    block = {"mode": "group", "level": "block", "blocks_per_group": 1, "use_stream": True}
    # flux-fast's inductor flags are left out: on the H200 they lengthened the first call from 19 s to
    # 120 s and did not make the steady state faster (2.87 s without, 2.91 s with).
    fast = {"transformer": {"quantize": {"method": "fp8_dynamic", "granularity": "row"}},
            "compile": {"mode": "regional", "fullgraph": True, "fuse_qkv": True, "inductor_flags": False}}
    out = {
        "bf16": {},
        "group offload, leaf level, streams": _all(leaf),
        "enable_model_cpu_offload": _all({"mode": "model"}),
        "flux-fast core (fused QKV, fp8 rowwise, regional compile)": fast,
        "group offload, block level, streams": _all(block, vae=leaf),
        "enable_sequential_cpu_offload": _all({"mode": "sequential"}),
    }
    if family in ("flux2", "qwenimage"):
        from fluxtune.tuning.nf4 import available

        if available():
            # How diffusers' FLUX.2 and Qwen-Image guides fit consumer cards: bitsandbytes NF4 for the
            # transformer and the LLM text encoder, each on the GPU only while it runs.
            nf4 = {"quantize": {"method": "nf4"}, "offload": {"mode": "model"}}
            out["bitsandbytes NF4 + enable_model_cpu_offload"] = {
                "transformer": nf4, "text_encoder": nf4, "vae": {"offload": {"mode": "model"}}}
    if family == "dit":
        # DiT has no text encoders and no fuse_qkv_projections; its blocks are compiled one by one.
        out.pop("flux-fast core (fused QKV, fp8 rowwise, regional compile)")
        out["fp8 rowwise + compile"] = {"transformer": {"quantize": {"method": "fp8_dynamic", "granularity": "row"}},
                                        "compile": {"mode": "regional", "fullgraph": True, "inductor_flags": False}}
    return out


def cap_label(cap: Cap) -> str:
    return format_bytes(cap) if cap is not None else "none"


def _cap_order(cap: Cap) -> float:
    return float("inf") if cap is None else float(cap)


@dataclass
class Candidate:
    name: str
    profile: Profile
    kind: str  # "profile" | "recipe" | "reference"
    caps: tuple[Cap, ...] = (None,)
    """Caps tried in order until one fits (a profile or the reference: exactly one)."""


@dataclass
class BenchRow:
    name: str
    kind: str
    status: Status
    cap: int | None = None
    """The allocator cap this row ran under (None: no cap)."""
    latency_s: float | None = None
    latency_spread: float | None = None
    first_call_s: float | None = None
    warmup_steps: int | None = None
    """Steps of the warm-up call when it was shorter than the workload's (first_call_s is that call)."""
    runs: int = 0
    peak_reserved: int | None = None
    peak_allocated: int | None = None
    peak_nvml: int | None = None
    psnr: float | None = None
    ssim: float | None = None
    apply_s: float | None = None
    quantize_s: float | None = None
    placement_s: float | None = None
    generations: int = 0
    """Calls that ran back to back under the cap (warm-up and timed), all without running out of memory."""
    fd: float | None = None
    kid: float | None = None
    """DiT ``--samples``: distribution shift from the reference's samples (:mod:`fluxtune.distribution`)."""
    error: str | None = None
    seconds: float | None = None
    key: str = ""
    extra: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.status = Status(self.status)  # bench.json holds the plain string

    @property
    def fits(self) -> bool:
        return self.status == Status.OK

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> BenchRow:
        known = {f.name for f in fields(cls)}
        return cls(**{k: v for k, v in data.items() if k in known})


def candidate_key(cand: Candidate, cap: Cap) -> str:
    """Identifies one (candidate, cap) measurement across resumed runs: name, kind, cap and the knobs (a
    profile's description and measured block, which ``--write-measured`` rewrites, do not count)."""
    knobs = {k: v for k, v in cand.profile.to_dict().items() if k not in ("measured", "description")}
    digest = hashlib.sha256(json.dumps(knobs, sort_keys=True, default=str).encode()).hexdigest()[:12]
    return f"{cand.kind}|{cand.name}|{cap_label(cap)}|{digest}"


def make_candidates(profiles: list[Profile], family: str, budgets: Sequence[Cap] | None, with_recipes: bool,
                    generation: dict[str, Any], *, reference: bool = True, dtype: str = "bfloat16") -> list[Candidate]:
    """The reference first, then the user's profiles, then the recipes.

    Args:
        dtype: the dtype the pipeline loads in, which the reference runs in (named in its label).
        budgets: None: no cap for anyone. One cap: every candidate runs under it. Several: each profile
            under its own ``budget.vram`` (which must be listed; None = no cap), each recipe under the
            smallest listed cap it fits.

    Raises:
        ProfileError: a profile's budget is not among several listed budgets.
    """
    from fluxtune.errors import ProfileError

    def uncapped(data: dict[str, Any]) -> dict[str, Any]:
        return {**data, "budget": {"vram": None, "enforce": False}}

    out: list[Candidate] = []
    if reference:
        short = {"bfloat16": "bf16", "float16": "fp16", "float32": "fp32"}.get(dtype, dtype)
        out.append(Candidate(f"reference ({short}, no cap)",
                             validate_profile({"name": "reference", "generation": generation}), "reference"))
    ladder: tuple[Cap, ...] = (None,)
    several = budgets is not None and len(budgets) > 1
    if budgets:
        ladder = tuple(sorted(set(budgets), key=_cap_order))
    for p in profiles:
        data = p.to_dict()
        if several:
            own = p.budget.vram if p.budget.enforce else None
            if own not in ladder:
                raise ProfileError(f"profile {p.name!r}: its budget.vram={cap_label(own)} is not in --budget "
                                   f"{','.join(cap_label(c) for c in ladder)}; add it to the list")
            caps: tuple[Cap, ...] = (own,)
        else:
            caps = ladder[:1]
        out.append(Candidate(p.name, validate_profile(uncapped(data)), "profile", caps))
    if with_recipes:
        for n, d in recipes(family).items():
            data = uncapped({**d, "name": n, "generation": {**generation, **d.get("generation", {})}})
            caps = ladder
            if n == "bf16" and reference and several:
                caps = tuple(c for c in ladder if c is not None)  # the reference is bf16 with no cap
                if not caps:
                    continue
            out.append(Candidate(n, validate_profile(data, source=f"recipe {n!r}"), "recipe", caps))
    return out


def _with_cap(profile: Profile, cap: Cap) -> Profile:
    data = profile.to_dict()
    data["budget"] = {"vram": cap, "enforce": cap is not None}
    return validate_profile(data)


def _cannot_fit(profile: Profile, cap: Cap, facts: Any, host_ram_budget: int | None) -> str | None:
    """Why a candidate certainly does not fit, before a worker loads it: its weights alone exceed the cap,
    or its host copies exceed this machine's memory (FLUX.2 [dev] in bf16 offloaded needs ~112 GB of the
    H200 host's 128 GB; the worker would be killed by the OS after minutes of loading). None: run it."""
    from fluxtune.memory import check_host_ram, predict

    if facts is None:
        return None
    try:
        pred = predict(profile, facts)
    except Exception:  # a model the memory model does not know: run it and see
        return None
    if cap is not None and pred.weights_floor > cap:
        return (f"its weights alone need {format_bytes(pred.weights_floor)} on the GPU at once (during "
                f"{pred.weights_floor_phase}) > cap {cap_label(cap)}; not run")
    host = check_host_ram(pred, profile.budget.host_ram or host_ram_budget)
    return f"{host}; not run" if host else None


def run_bench(
    candidates: list[Candidate],
    *,
    model: str,
    device: str,
    workload: dict[str, Any],
    folder: Path,
    recipe_workload: dict[str, Any] | None = None,
    dtype: str = "bfloat16",
    timeout_s: float = 900.0,
    total_timeout_s: float | None = None,
    time_box_s: float | None = None,
    samples: int = 0,
    resume: bool = True,
    host_ram_budget: int | None = None,
    say: Callable[[str], None] = print,
    session: str | None = None,
    machine: dict[str, str] | None = None,
) -> list[BenchRow]:
    """Run every candidate in a fresh worker process; the first is the quality reference.

    Args:
        workload: what profiles render (``Workload`` data).
        recipe_workload: what the reference and the recipes render (same calls; fewer timed runs or a
            shorter warm-up); default ``workload``.
        timeout_s: the most one candidate may take.
        total_timeout_s: the whole bench: no candidate starts with less than a minute left, and a
            running one is stopped at the deadline (status ``timeout``, run again on resume).
        time_box_s: per recipe (and the reference), timed runs stop before one that would end past this
            (>= 1 run); profiles always run all of theirs, so that their back-to-back count means something.
        samples: class-conditional models: each candidate also renders that many samples on fixed
            labels and seeds, and its row gets their distribution shift from the reference's (FD and KID
            in :mod:`fluxtune.distribution`'s random-feature space; not FID).
        resume: keep the rows of a previous run of the same model and workload in ``folder``.
        host_ram_budget: host memory a candidate may need (its process and the host copies of offloaded
            weights); one the memory model puts above it is not run (status ``no_fit``).
        say: where progress lines go; a profile's also says each warm-up and timed call as it ends.
        session: the workers' session class (``module:Class``); tests swap in one that misbehaves.
        machine: what the rows were measured on (GPU, emulated card, library versions); a bench.json of
            another machine is not resumed: its rows would be compared with these as if in one bench.
    """
    from fluxtune.worker import DEFAULT_SESSION, RunOutcome, RunRequest, Worker, WorkerDied, WorkerSpec

    folder.mkdir(parents=True, exist_ok=True)
    meta = {"model": model, "workload": workload, "recipe_workload": recipe_workload or workload, "samples": samples,
            "machine": machine or {}}
    previous = _previous_rows(folder, meta) if resume else {}
    if previous:
        say(f"resuming: {len(previous)} row(s) from {folder / 'bench.json'} kept")
    # The rows this bench can produce; a kept row with another key (a candidate no longer asked for, or a
    # recipe whose definition changed) stays in bench.json as an earlier row, out of its tables.
    planned = {candidate_key(c, cap) for c in candidates for cap in c.caps}
    rows: list[BenchRow] = []
    facts: Any = None
    ref_feats: list[list[float]] | None = None
    deadline = time.monotonic() + total_timeout_s if total_timeout_s else None
    stopped = False
    n = len(candidates)
    for i, cand in enumerate(candidates):
        wl = workload if cand.kind == "profile" else (recipe_workload or workload)
        for cap in cand.caps:
            key = candidate_key(cand, cap)
            label = f"[{i + 1}/{n}] {cand.name} (cap {cap_label(cap)})"
            if key in previous and previous[key].status in FINAL:
                r = previous[key]
                say(f"{label}: kept from the previous run: {r.status}"
                    + (f" {r.latency_s:.2f}s" if r.latency_s else ""))
                rows.append(r)
                if r.extra.get("features") is not None and cand.kind == "reference":
                    ref_feats = r.extra["features"]
                if not r.status.did_not_fit():
                    break
                continue
            profile = _with_cap(cand.profile, cap)
            why = _cannot_fit(profile, cap, facts, host_ram_budget)
            if why is not None:
                r = BenchRow(cand.name, cand.kind, Status.NO_FIT, cap=cap, key=key, error=why)
                say(f"{label}: does not fit: {r.error}")
                rows.append(r)
                _write(folder, meta, rows, previous, planned)
                continue
            left = deadline - time.monotonic() if deadline is not None else None
            if left is not None and left < MIN_START_S:
                stopped = True
                break
            limit = min(timeout_s, left) if left is not None else timeout_s
            spec = WorkerSpec(model=model, device=device, dtype=dtype, workload=wl, budget_bytes=cap,
                              study_dir=str(folder), fixed_workload=True, session=session or DEFAULT_SESSION)
            t0 = time.monotonic()
            say(f"{label} ...")
            # A profile's calls can take minutes each under a small cap: say each one as it ends.
            live = _live_lines(say) if cand.kind == "profile" else None
            partial: Progress | None = None
            try:
                worker = Worker(spec)
                try:
                    if facts is None and worker.info.facts:
                        from fluxtune.memory import ModelFacts

                        facts = ModelFacts.from_dict(worker.info.facts)
                    request = RunRequest(profile, role="reference" if cand.kind == "reference" else "trial",
                                         samples=samples, time_box_s=None if cand.kind == "profile" else time_box_s)
                    result = worker.run(request, max(1.0, limit - (time.monotonic() - t0)), on_progress=live)
                finally:
                    worker.stop()
            except WorkerDied as e:  # its message says where the worker was; its progress, what it had measured
                result = RunOutcome(Status.TIMEOUT if e.timed_out else Status.CRASHED, error=str(e))
                partial = e.progress
            r = _row(cand, cap, key, result, wl)
            if partial is not None:
                _keep_partial(r, partial)
            r.seconds = time.monotonic() - t0
            feats = result.features
            if feats is not None and cand.kind == "reference":
                ref_feats = feats
                r.extra["features"] = feats  # kept so a resumed bench still has the reference's samples
            elif feats is not None and ref_feats is not None and len(feats) == len(ref_feats):
                import torch

                from fluxtune.distribution import compare_features

                shift = compare_features(torch.tensor(feats, dtype=torch.float64),
                                         torch.tensor(ref_feats, dtype=torch.float64))
                r.fd, r.kid = shift.fd, shift.kid_mean
            if result.features_error:
                say(f"    samples failed: {result.features_error}")
            rows.append(r)
            _write(folder, meta, rows, previous, planned)
            lat = f"{r.latency_s:.2f}s" if r.latency_s else "-"
            say(f"    {r.status}: {lat}, peak {format_bytes(r.peak_reserved or 0)} ({r.seconds:.0f}s)"
                + (f" - {r.error}" if r.error and r.status != Status.OK else ""))
            if not r.status.did_not_fit():
                break
        if stopped:
            say(f"stopped: less than {MIN_START_S:.0f}s left of --timeout; re-run the same command to continue "
                f"({n - i} candidate(s) to go)")
            break
    _write(folder, meta, rows, previous, planned)
    return rows


def _previous_rows(folder: Path, meta: dict[str, Any]) -> dict[str, BenchRow]:
    """The rows of ``folder``'s bench.json, if it is a bench of the same model, workload and machine.

    Raises:
        ProfileError: it holds another bench's rows (resuming would mix them in; writing would lose them).
    """
    from fluxtune.errors import ProfileError

    path = folder / "bench.json"
    if not path.exists():
        return {}
    try:
        data = json.loads(path.read_text())
    except (OSError, json.JSONDecodeError):
        return {}
    if not isinstance(data, dict):
        return {}
    want, have = json.loads(json.dumps(meta, default=str)), data.get("meta") or {}
    if have != want:
        if not data.get("rows") and not data.get("earlier_rows"):
            return {}
        field = next(k for k in [*want, *have] if have.get(k) != want.get(k))
        raise ProfileError(f"--out {folder}: its bench.json holds rows of another bench ({field}: "
                           f"{_short(have.get(field))} there, {_short(want.get(field))} here); give another --out, "
                           "or --fresh to replace them")
    out: dict[str, BenchRow] = {}
    for raw in [*data.get("earlier_rows", []), *data.get("rows", [])]:
        r = BenchRow.from_dict(raw)
        if r.key:  # all of them: a timed-out row is run again, but what it had measured stays until then
            out[r.key] = r
    return out


def _short(value: Any) -> str:
    text = json.dumps(value, default=str, sort_keys=True)
    return text if len(text) <= 80 else text[:77] + "..."


def _write(folder: Path, meta: dict[str, Any], rows: list[BenchRow], previous: dict[str, BenchRow],
           planned: set[str]) -> None:
    # Rows of the previous run that this one did not reach (yet) are kept too: nothing measured is lost.
    # Those it will never reach are kept as earlier rows, out of ``rows`` and the summary, so that
    # bench.json's comparison is the one this bench printed.
    seen = {r.key for r in rows}
    kept = rows + [r for k, r in previous.items() if k not in seen and k in planned]
    earlier = [r for k, r in previous.items() if k not in seen and k not in planned]
    data = {"meta": meta, "rows": [asdict(r) for r in kept], "summary": summary(kept),
            "earlier_rows": [asdict(r) for r in earlier]}
    tmp = folder / "bench.json.tmp"
    tmp.write_text(json.dumps(data, indent=1, default=str))
    tmp.replace(folder / "bench.json")


def _row(cand: Candidate, cap: Cap, key: str, result: RunOutcome, workload: dict[str, Any]) -> BenchRow:
    from fluxtune.measure import Measurement

    m = result.measurement or Measurement(status=result.status)
    q = result.quality or {}
    t = result.timings
    runs = m.latency_runs
    spread = (max(runs) - min(runs)) if len(runs) > 1 else None
    short = workload.get("warmup_steps")
    return BenchRow(
        name=cand.name, kind=cand.kind, status=result.status, cap=cap, key=key,
        latency_s=m.latency_s, latency_spread=spread, first_call_s=m.first_call_s,
        warmup_steps=short if short and m.warmup_s else None, runs=len(runs),
        peak_reserved=m.peak_reserved, peak_allocated=m.peak_allocated, peak_nvml=m.peak_nvml,
        psnr=q.get("psnr"), ssim=q.get("ssim"), apply_s=t.apply_s, quantize_s=t.quantize_s,
        placement_s=t.placement_s, error=result.error,
        generations=(len(m.warmup_s) + len(runs)) if result.status == Status.OK else 0,
        extra={"text_encode_s": m.text_encode_s, "step_s": m.step_s, "decode_s": m.decode_s,
               "host_ram_peak": m.host_ram_peak, "latency_runs": list(runs) if result.measurement else None,
               "imports_s": t.imports_s, "apply_parts": t.parts},
    )


def _keep_partial(row: BenchRow, progress: Progress) -> None:
    """What a worker stopped (timed out, crashed) had measured, into its row: the finished calls' latencies,
    the peaks so far, apply's time. The row keeps its status: a resumed bench runs it again."""
    row.peak_reserved, row.peak_allocated = progress.peak_reserved, progress.peak_allocated
    row.apply_s = progress.apply_s
    if progress.warmup_s:
        row.first_call_s = progress.warmup_s[0]
    row.extra["host_ram_peak"] = progress.host_ram_peak
    row.extra["partial_latency_runs"] = list(progress.latencies)
    row.extra["progress"] = progress.to_dict()


def _live_lines(say: Callable[[str], None]) -> Callable[[Progress], None]:
    """A worker progress callback that says apply's time and each warm-up and timed call once it ended."""
    shown = {"apply": False, "warm-up": 0, "run": 0}

    def show(p: Progress) -> None:
        if p.apply_s is not None and not shown["apply"]:
            shown["apply"] = True
            say(f"    apply: {format_seconds(p.apply_s)} s")
        for i in range(shown["warm-up"], p.warmup_done):
            say(f"    warm-up {i + 1}/{p.warmup_total}: {format_seconds(p.warmup_s[i])} s")
        for i in range(shown["run"], p.runs_done):
            say(f"    run {i + 1}/{p.runs_total}: {format_seconds(p.latencies[i])} s")
        shown["warm-up"], shown["run"] = p.warmup_done, p.runs_done

    return show


def summary(rows: list[BenchRow]) -> list[dict[str, Any]]:
    """Per cap a profile ran under: the profile, the fastest recipe that fits that cap, and the ratio.

    A recipe fits a cap when it ran under that cap or a smaller one (its memory does not depend on the
    cap); the uncapped bf16 reference is the ``bf16`` recipe of the no-cap budget."""
    out: list[dict[str, Any]] = []
    for p in (r for r in rows if r.kind == "profile"):
        fitting = [r for r in rows if r.kind in ("recipe", "reference") and r.fits and r.latency_s
                   and _cap_order(r.cap) <= _cap_order(p.cap)]
        best = min(fitting, key=lambda r: r.latency_s or 0.0) if fitting else None
        ratio = (best.latency_s / p.latency_s) if best and best.latency_s and p.fits and p.latency_s else None
        out.append({"cap": p.cap, "profile": p.name, "status": p.status, "latency_s": p.latency_s,
                    "recipe": best.name if best else None, "recipe_latency_s": best.latency_s if best else None,
                    "recipe_cap": best.cap if best else None, "speedup": ratio})
    return out


ROW_COLUMNS = ("candidate", "cap", "status", "latency (median)", "spread", "runs", "first call", "peak reserved",
               "PSNR vs reference", "generations", "apply (quantize, placement)")
SUMMARY_COLUMNS = ("budget", "profile", "latency", "fastest recipe that fits", "its latency", "speedup")


def row_cells(r: BenchRow, *, samples: bool = False, why: bool = False) -> list[str]:
    """One row's cells under :data:`ROW_COLUMNS` (plus FD, KID with ``samples``); ``why`` puts the error
    of a row that did not run in the status cell."""
    first = "-"
    if r.first_call_s:
        first = f"{r.first_call_s:.1f} s" + (f" ({r.warmup_steps} steps)" if r.warmup_steps else "")
    status = (r.error or r.status)[:90] if why and not r.fits else r.status
    cells = [
        r.name, cap_label(r.cap), status, f"{r.latency_s:.2f} s" if r.latency_s else "-",
        f"{r.latency_spread:.2f} s" if r.latency_spread is not None else "-", str(r.runs or "-"), first,
        format_bytes(r.peak_reserved) if r.peak_reserved else "-",
        f"{min(r.psnr, 100):.1f} dB" if r.psnr is not None else "-", str(r.generations or "-"),
        f"{r.apply_s:.2f} s ({r.quantize_s or 0:.2f} s, {r.placement_s or 0:.2f} s)" if r.apply_s is not None else "-",
    ]
    if samples:
        cells += [f"{r.fd:.3g}" if r.fd is not None else "-", f"{r.kid:.2g}" if r.kid is not None else "-"]
    return cells


def summary_cells(rows: list[BenchRow]) -> list[list[str]]:
    """The per-budget comparison of :func:`summary` as cells under :data:`SUMMARY_COLUMNS`."""
    return [[cap_label(s["cap"]), s["profile"], f"{s['latency_s']:.2f} s" if s["latency_s"] else s["status"],
             s["recipe"] or "none fits", f"{s['recipe_latency_s']:.2f} s" if s["recipe_latency_s"] else "-",
             f"{s['speedup']:.2f}x" if s["speedup"] else "-"] for s in summary(rows)]


def markdown(rows: list[BenchRow], *, command: str | None = None) -> str:
    """The rows and the per-budget comparison as Markdown tables (for a README or a results folder)."""

    def table(head: Sequence[str], body: list[list[str]]) -> list[str]:
        return ["| " + " | ".join(head) + " |", "|" + "---|" * len(head), *("| " + " | ".join(c) + " |" for c in body)]

    lines = table(ROW_COLUMNS, [row_cells(r, why=True) for r in rows])
    lines += ["", *table(SUMMARY_COLUMNS, summary_cells(rows))]
    if command:
        lines += ["", f"Command: `{command}`"]
    return "\n".join(lines) + "\n"


def plot(rows: list[BenchRow], path: Path, budgets: Sequence[Cap], title: str) -> Path:
    """Latency against peak reserved memory, profiles and recipes, with a line at each budget."""
    from fluxtune.report import plot_latency_vs_memory

    # On CPU there is no allocator peak: the host memory peak is what was measured.
    gpu = any(r.peak_reserved for r in rows)
    peak = (lambda r: r.peak_reserved) if gpu else (lambda r: r.extra.get("host_ram_peak"))  # noqa: E731
    table = [{"trial": i, "latency_s": r.latency_s, "peak": peak(r), "feasible": r.fits,
              "name": r.name} for i, r in enumerate(rows) if r.kind == "profile"]
    baselines = [{"name": r.name, "latency_s": r.latency_s, "peak": peak(r)}
                 for r in rows if r.kind != "profile" and r.fits]
    return plot_latency_vs_memory(table, path, budget=[c for c in budgets if c is not None] if gpu else None,
                                  baselines=baselines, title=title, label_points=True, point_label="profiles",
                                  memory_label="peak VRAM (reserved)" if gpu else "peak host RAM",
                                  baseline_label="diffusers recipes (run under the smallest cap they fit)")


def write_measured(source: str, profile: Profile, rows: list[BenchRow], *, model: str, workload: dict[str, Any],
                   hardware: Any) -> Path | None:
    """Write a profile's bench row into its YAML file's ``measured`` block (the rest of the file is kept).

    Args:
        source: the profile's YAML path or preset name, as given to the bench.
        profile: the profile as benched.
        rows: the bench's rows.
        model: the model benched.
        workload: the profiles' workload.
        hardware: the :class:`fluxtune.hardware.HardwareInfo` it ran on.

    Returns:
        The file written, or None when the profile has no measured row.
    """
    import datetime as dt

    from fluxtune.hardware import library_versions
    from fluxtune.presets import list_presets, load_profile, update_measured

    row = next((r for r in rows if r.kind == "profile" and r.name == profile.name and r.fits), None)
    if row is None:
        return None
    path = Path(source) if Path(source).exists() else list_presets().get(source)
    if path is None:
        return None
    s = next((x for x in summary(rows) if x["profile"] == profile.name), None)
    notes = None
    if s and s["speedup"]:
        notes = (f"the fastest diffusers recipe that fits {cap_label(row.cap)}, measured in the same bench: "
                 f"{s['recipe']} at {s['recipe_latency_s']:.2f} s ({s['speedup']:.2f}x); {row.generations} "
                 f"generations back to back under the cap without running out of memory; apply {row.apply_s:.2f} s "
                 f"(quantize {row.quantize_s or 0:.2f} s, placement {row.placement_s or 0:.2f} s)")
        if (row.extra.get("imports_s") or 0) >= 0.05:
            notes += f"; the first apply in a process also imports torchao/TorchDynamo: {row.extra['imports_s']:.2f} s"
    versions = {k: v for k, v in library_versions().items() if k in ("torch", "diffusers", "torchao", "transformers")}
    measured = {
        "status": "measured", "source": "fluxtune bench", "date": dt.date.today().isoformat(),
        "hardware": hardware.fingerprint(), "versions": versions, "model": model,
        "workload": {**workload, "height": profile.generation.height, "width": profile.generation.width,
                     "steps": profile.generation.steps,
                     **{k: v for k in ("negative_prompt", "true_cfg_scale")
                        if (v := getattr(profile.generation, k)) is not None}},
        "latency_s": round(row.latency_s or 0.0, 3), "first_call_s": round(row.first_call_s or 0.0, 2),
        "peak_allocated": row.peak_allocated, "peak_reserved": row.peak_reserved, "peak_nvml": row.peak_nvml,
        "peak_host_rss": row.extra.get("host_ram_peak"),
        "quality": {k: round(v, 2) for k, v in (("psnr", row.psnr), ("ssim", row.ssim)) if v is not None},
        "notes": notes,
    }
    original = load_profile(path)
    return update_measured(path, original.replace(measured=measured))  # atomic; keeps the user's comments
