"""Reading a study back: trial rows, the best trial or Pareto front with a knee, the winning profile."""

from __future__ import annotations

import datetime as dt
import math
from typing import Any

from fluxtune.profile import Profile, validate_profile
from fluxtune.search.study import CONFIG_KEY
from fluxtune.status import Status


def rows(study: Any) -> list[dict[str, Any]]:
    """One flat dict per trial, in trial order (what the CSV/JSON report holds)."""
    out = []
    for t in study.get_trials(deepcopy=False):
        a = t.user_attrs
        m = a.get("measurement") or {}
        q = a.get("quality") or {}
        cons = a.get("constraints") or {}
        out.append({
            "trial": t.number + 1,  # trials are numbered from 1 wherever a user reads them
            "state": t.state.name,
            "status": a.get("status", t.state.name.lower()),
            "source": a.get("source", "sampler"),
            "config": a.get("config", ""),
            "feasible": bool(cons) and all(v <= 0 for v in cons.values()) if t.state.name == "COMPLETE" else False,
            "latency_s": a.get("latency_s"),
            "latency_spread": spread(m.get("latency_runs")),
            "images_per_call": m.get("images_per_call"),
            "throughput": a.get("throughput"),
            "first_call_s": m.get("first_call_s"),
            "projected_s": m.get("projected_latency_s"),
            "wall_s": a.get("wall_s"),
            "duplicate_of": a.get("duplicate_of"),
            "step_s": m.get("step_s"),
            "text_encode_s": m.get("text_encode_s"),
            "decode_s": m.get("decode_s"),
            "peak_reserved": m.get("peak_reserved"),
            "peak_allocated": m.get("peak_allocated"),
            "peak_nvml": m.get("peak_nvml"),
            "host_ram_peak": m.get("host_ram_peak"),
            "peak": a.get("peak"),
            "predicted_peak": a.get("predicted_peak"),
            "predicted_allocated": a.get("predicted_allocated"),
            "psnr": q.get("psnr"),
            "ssim": q.get("ssim"),
            "latent_rmse": q.get("latent_rmse"),
            "adherence": q.get("adherence"),
            "apply_s": a.get("apply_s"),
            "error": a.get("error"),
            "seconds": (t.datetime_complete - t.datetime_start).total_seconds()
            if t.datetime_complete and t.datetime_start else None,
        })
    return out


def objective_of(study: Any) -> str:
    """The objective a study was created for (latency for studies that did not record one)."""
    return str(study.user_attrs.get(CONFIG_KEY, {}).get("objective", "latency"))


def spread(runs: Any) -> float | None:
    """Slowest minus fastest timed run: the noise a difference between two trials must exceed."""
    if not isinstance(runs, list) or len(runs) < 2:
        return None
    return float(max(runs) - min(runs))


def feasible_trials(study: Any) -> list[Any]:
    from optuna.trial import TrialState

    out = []
    for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,)):
        cons = t.user_attrs.get("constraints") or {}
        if t.user_attrs.get("status") == Status.OK and all(v <= 0 for v in cons.values()):
            out.append(t)
    return out


def best_trial(study: Any) -> Any | None:
    """The best feasible trial for single-objective studies; the knee of the front for pareto."""
    feas = feasible_trials(study)
    if not feas:
        return None
    objective = objective_of(study)
    from optuna.trial import TrialState

    from fluxtune.search.retime import recorded_winner

    # The finalists re-timed interleaved at the end of the search: their medians over the rounds beat
    # each trial's own timing, made minutes apart from its rivals'.
    winner = recorded_winner(study, len(study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))))
    if winner is not None and any(t.number == winner for t in feas):
        return next(t for t in feas if t.number == winner)
    if objective == "latency":
        return min(feas, key=lambda t: t.values[0])
    if objective in ("quality", "throughput"):
        return max(feas, key=lambda t: t.values[0])
    return knee(pareto_front(study))


def pareto_front(study: Any) -> list[Any]:
    """Feasible trials no other feasible trial beats on both latency (lower) and PSNR (higher)."""
    feas = [t for t in feasible_trials(study) if len(t.values) == 2]
    front = []
    for t in feas:
        lat, q = t.values
        dominated = any(o.values[0] <= lat and o.values[1] >= q and (o.values[0] < lat or o.values[1] > q) for o in feas)
        if not dominated:
            front.append(t)
    return sorted(front, key=lambda t: t.values[0])


def knee(front: list[Any]) -> Any | None:
    """The front's knee: the point farthest from the line joining its two ends (normalised axes)."""
    if len(front) <= 2:
        return front[0] if front else None
    lat = [t.values[0] for t in front]
    q = [min(t.values[1], 100.0) for t in front]
    lo_l, hi_l, lo_q, hi_q = min(lat), max(lat), min(q), max(q)
    span_l, span_q = (hi_l - lo_l) or 1.0, (hi_q - lo_q) or 1.0
    pts = [((x - lo_l) / span_l, (y - lo_q) / span_q) for x, y in zip(lat, q, strict=True)]
    (x1, y1), (x2, y2) = pts[0], pts[-1]
    norm = math.hypot(x2 - x1, y2 - y1) or 1.0
    dist = [abs((y2 - y1) * x - (x2 - x1) * y + x2 * y1 - y2 * x1) / norm for x, y in pts]
    return front[max(range(len(front)), key=dist.__getitem__)]


def best_so_far(study: Any) -> list[tuple[int, float | None]]:
    """(Optuna trial number, from 0; best feasible objective so far) for the progress curve (first objective)."""
    feas = {t.number for t in feasible_trials(study)}
    objective = objective_of(study)
    sign = -1.0 if objective in ("quality", "throughput") else 1.0
    best: float | None = None
    out = []
    for t in study.get_trials(deepcopy=False):
        if not t.state.is_finished():  # enqueued or running: not a point of the curve yet
            continue
        if t.number in feas:
            v = t.values[0]
            if best is None or sign * v < sign * best:
                best = v
        out.append((t.number, best))
    return out


def _call(data: dict[str, Any], cfg: dict[str, Any]) -> dict[str, Any]:
    g = data.get("generation") or {}
    out = {"height": g.get("height"), "width": g.get("width"), "steps": g.get("steps", 28),
           "images_per_prompt": g.get("images_per_prompt", 1), "dtype": cfg.get("dtype")}
    return {k: v for k, v in out.items() if v is not None}


def profile_of(trial: Any, study: Any, name: str | None = None) -> Profile:
    """The trial's profile with its measured block filled in."""
    cfg = study.user_attrs.get(CONFIG_KEY, {})
    data = dict(trial.user_attrs["profile"])
    m = trial.user_attrs.get("measurement") or {}
    quality = {k: float(v) for k, v in (trial.user_attrs.get("quality") or {}).items() if isinstance(v, int | float)}
    data["name"] = name or f"{study.study_name}-trial{trial.number + 1}"
    data["description"] = data.get("description") or (
        f"found by fluxtune search ({cfg.get('objective')} objective) on {cfg.get('model')}")
    data["measured"] = {
        "status": "measured",
        "source": "fluxtune search",
        "date": dt.date.today().isoformat(),
        "hardware": trial.user_attrs.get("hardware") or cfg.get("hardware", {}),
        "versions": cfg.get("versions", {}),
        "model": cfg.get("model"),
        # The call and precision it was measured at, so the profile says what it was validated for.
        "workload": {**cfg.get("workload", {}), **_call(data, cfg)},
        "latency_s": m.get("latency_s"),
        "throughput": trial.user_attrs.get("throughput"),
        "first_call_s": m.get("first_call_s"),
        "peak_allocated": m.get("peak_allocated"),
        "peak_reserved": m.get("peak_reserved"),
        "peak_nvml": m.get("peak_nvml"),
        "quality": quality,
        "study": study.study_name,
        "trial": trial.number + 1,
    }
    return validate_profile(data, source=f"trial {trial.number + 1}")
