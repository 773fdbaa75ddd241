"""Issue 17's ablation replayed on the measured DiT grid: structure (plain start, then one-knob moves, then
TPE) against Optuna's TPE alone, over many seeds, with the grid's H200 measurements as the objective.

    python scripts/replay_grid.py docs/results/2026-12-03/session11/dit-grid.jsonl [--seeds 50] [--trials 12]

On the GPU each arm could run once (a 30-minute device session); this replays both on the 64 cells the
grid measured (batch x quantization x offload x compile, 8 GB cap, 50 steps), so the comparison has a
spread. Both arms use the search's own pieces: the space narrowed to the grid's dimensions, the memory
model's admission (a trial predicted over the budget is skipped, as the search does, and counts as a
trial), ``descent.plain_start``, ``descent.incumbent`` and ``descent.next_move``, and Optuna's default ``TPESampler`` with a
different seed per replay. A cell's value is its measured images/s; a cell the grid pruned (projected
far slower than the best at the time) gets its projected images/s; out-of-memory and failed cells fail.
No GPU is needed: this says how many trials each strategy needs on these measurements, not how long
they take.
"""

from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path
from typing import Any

import optuna

from fluxtune.hardware import HardwareInfo
from fluxtune.memory import predict
from fluxtune.memory.facts import ModelFacts
from fluxtune.presets import load_profile
from fluxtune.search.descent import incumbent, last_moved, next_move, plain_start
from fluxtune.search.runner import SKIP_MARGIN, _block_bytes
from fluxtune.search.space import SearchSpace
from fluxtune.search.study import CONFIG_KEY
from fluxtune.units import parse_bytes

H200 = HardwareInfo(gpu_index=0, gpu_name="NVIDIA H200", total_memory_bytes=150754820096, compute_capability=(9, 0),
                    driver="580", cuda_version="13.0", torch_version="2.11.0", host_ram_bytes=int(128e9), cpu_count=16)
GRID_DIMS = {"batch": [8, 16, 32, 64], "transformer.quantize": ["none", "int8_weight", "int8_dynamic", "fp8_dynamic"],
             "transformer.offload": ["none", "partial"], "compile": ["off", "regional"]}
PINNED = {"cache": "none", "vae.tiling": False, "transformer.layerwise_fp8": False, "transformer.keep_sensitive": 0,
          "transformer.granularity": "row", "compile.fullgraph": False, "compile.fuse_qkv": False,
          "compile.inductor_flags": False, "attention": "native", "transformer.resident_fraction": 0.5,
          "steps": 50}
"""The dimensions the grid did not vary, at the values it ran (half the blocks resident when partial)."""


class Grid:
    def __init__(self, path: Path) -> None:
        self.rows = {r["cell"]: r for r in map(json.loads, path.read_text().splitlines()) if r.get("cell")}
        ok = [r["throughput"] for r in self.rows.values() if r["status"] == "ok"]
        self.best = max(ok)

    def value(self, params: dict[str, Any]) -> float | None:
        key = "/".join(str(params.get(k)) for k in ("transformer.quantize", "compile", "transformer.offload", "batch"))
        row = self.rows.get(key)
        if row is None:
            raise SystemExit(f"replay: the grid has no cell {key} (params {params})")
        if row["status"] == "ok":
            return float(row["throughput"])
        if row["status"] == "pruned" and row.get("projected_latency_s"):
            return params["batch"] / float(row["projected_latency_s"])
        return None


def make_space() -> tuple[SearchSpace, Any]:
    facts = ModelFacts.for_builtin("dit-xl-2-256")
    base = load_profile({"name": "base", "family": "dit", "budget": {"vram": "8GB"}, "generation": {"steps": 50}})
    narrow = {**GRID_DIMS, **{k: [v] for k, v in PINNED.items()}}
    return SearchSpace.create(H200, "dit", base, narrow, transformer_bytes=_block_bytes(facts)), facts


def replay(space: SearchSpace, facts: Any, grid: Grid, seed: int, trials: int, structured: bool) -> list[float]:
    """Best-so-far images/s after each trial of one replayed search."""
    budget = parse_bytes("8GB")

    def predicted(params: dict[str, Any]) -> int:
        return int(predict(space.profile(params), facts).peak_vram)

    def fits(params: dict[str, Any]) -> bool:
        try:
            return predicted(params) <= budget
        except Exception:
            return False

    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed))
    study.set_user_attr(CONFIG_KEY, {"objective": "throughput"})  # what descent.incumbent reads
    if structured:
        start = plain_start(space, fits)
        if start is not None:
            study.enqueue_trial(start[1], user_attrs={"source": start[0]})
    curve: list[float] = []
    seen: dict[str, float | None] = {}
    for _ in range(trials):
        done = study.get_trials(deepcopy=False)
        if structured and not any(t.state == optuna.trial.TrialState.WAITING for t in done):
            current = incumbent(study)
            if current is not None:
                after = last_moved([str(t.user_attrs.get("source", "")) for t in done])
                move = next_move(space, current, [dict(t.params) for t in done], fits, after)
                if move is not None:
                    study.enqueue_trial(move[1], user_attrs={"source": move[0]})
        trial = study.ask()
        space.suggest(trial)
        key = json.dumps(trial.params, sort_keys=True, default=str)
        if predicted(trial.params) > budget * SKIP_MARGIN:
            study.tell(trial, state=optuna.trial.TrialState.FAIL)  # skipped: predicted over the budget
        else:
            value = seen[key] if key in seen else grid.value(trial.params)  # a repeat: its stored result
            seen[key] = value
            if value is None:
                study.tell(trial, state=optuna.trial.TrialState.FAIL)
            else:
                # The attributes the search's own readers (best_trial, feasible_trials) look at.
                for k, v in {"status": "ok", "throughput": value, "constraints": {}}.items():
                    trial.set_user_attr(k, v)
                study.tell(trial, value)
        values = [t.value for t in study.get_trials(deepcopy=False) if t.state == optuna.trial.TrialState.COMPLETE]
        curve.append(max(values) if values else 0.0)
    return curve


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("grid", type=Path)
    ap.add_argument("--seeds", type=int, default=50)
    ap.add_argument("--trials", type=int, default=12)
    ap.add_argument("--target", type=float, default=0.95, help="share of the grid's best to reach")
    ap.add_argument("--out", type=Path, help="write the per-seed curves as JSON here")
    ap.add_argument("--plot", type=Path, help="draw each arm's best-so-far (median and 10-90 %% band) here")
    args = ap.parse_args()
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    grid = Grid(args.grid)
    space, facts = make_space()
    goal = args.target * grid.best
    print(f"grid best {grid.best:.2f} images/s; target {args.target:.0%} of it = {goal:.2f} images/s; "
          f"{args.trials} trials, {args.seeds} seeds")
    result: dict[str, Any] = {"grid_best": grid.best, "target": goal, "trials": args.trials, "arms": {}}
    for name, structured in (("structure (plain start, descent, then TPE)", True), ("TPE alone", False)):
        curves = [replay(space, facts, grid, seed, args.trials, structured) for seed in range(args.seeds)]
        reach = [next((i + 1 for i, v in enumerate(c) if v >= goal), None) for c in curves]
        hit = [r for r in reach if r is not None]
        finals = [c[-1] for c in curves]
        median_reach = f"{statistics.median(hit):g}" if hit else "-"
        print(f"{name}: reached the target in {len(hit)}/{len(curves)} replays within {args.trials} trials "
              f"(median trial {median_reach}); best after {args.trials} trials: median {statistics.median(finals):.2f}, "
              f"worst {min(finals):.2f} images/s")
        result["arms"][name] = {"reach": reach, "curves": curves}
    if args.out:
        args.out.write_text(json.dumps(result, indent=1))
    if args.plot:
        _plot(result, args.plot)


def _plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    import numpy as np

    fig, ax = plt.subplots(figsize=(7, 4))
    for name, arm in result["arms"].items():
        curves = np.array(arm["curves"])
        x = np.arange(1, curves.shape[1] + 1)
        line = ax.plot(x, np.median(curves, axis=0), marker="o", label=f"{name} (median)")[0]
        ax.fill_between(x, np.percentile(curves, 10, axis=0), np.percentile(curves, 90, axis=0),
                        color=line.get_color(), alpha=0.2)
    ax.axhline(result["grid_best"], color="k", lw=0.8, ls="--", label="grid best (measured)")
    ax.axhline(result["target"], color="k", lw=0.8, ls=":", label="95 % of it")
    ax.set(xlabel="trial", ylabel="best so far, images/s",
           title=f"DiT-XL/2 256 under 8 GB: replayed on the H200 grid, {len(next(iter(result['arms'].values()))['curves'])} seeds")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


if __name__ == "__main__":
    main()
