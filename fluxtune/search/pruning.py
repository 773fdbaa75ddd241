"""Multi-fidelity: a trial is projected from its first warm steps and pruned when it clearly cannot win.

The worker times the first steps after the first one (which compiles and fills caches) and projects the
call's latency as their median times the step count, a lower bound (text encoding and decoding are left
out). :class:`ProjectionPruner` says where "clearly worse" starts, from the study's incumbent (or the
lossless reference, when it is faster or no trial has finished), and is the
study's Optuna pruner: the runner reports the projection with ``trial.report`` and asks
``trial.should_prune()``, so a pruned trial is an Optuna ``PRUNED`` trial with its intermediate value.
"""

from __future__ import annotations

import optuna

from fluxtune.measure.timing import PROBE_STEPS
from fluxtune.search.results import feasible_trials

MARGIN = 1.3
"""A trial whose lower-bound projection is 30 % slower than the incumbent cannot win: far beyond the
run-to-run spread of the streamed presets (the 12 GB preset's ten runs span 3.25-4.21 s on the H200)."""

# The runner reports a projection at step PROBE_STEPS, the number of warm steps it was made from.
__all__ = ["MARGIN", "PROBE_STEPS", "ProjectionPruner"]


class ProjectionPruner(optuna.pruners.BasePruner):
    """Prune a trial whose projected call latency exceeds :meth:`threshold`.

    Args:
        objective: the search's objective: latency (the incumbent's latency), throughput (the incumbent's
            images per second at this trial's images per call), quality (the latency cap, when set);
            pareto trials are never pruned (any point may be on the front).
        max_latency: the quality objective's latency cap, seconds per call.
        margin: how much slower than the incumbent (or the cap) the projection must be.
    """

    def __init__(self, objective: str, max_latency: float | None = None, margin: float = MARGIN) -> None:
        self.objective, self.max_latency, self.margin = objective, max_latency, margin

    def threshold(self, study: optuna.Study, images_per_call: int = 1) -> float | None:
        """Seconds per call above which a trial cannot win (None: do not prune)."""
        if self.objective == "quality":
            return self.max_latency * self.margin if self.max_latency else None
        done = feasible_trials(study)
        # The lossless reference ran under the same budget and workload: a trial clearly slower than it
        # cannot win either, so the first trials have something to be pruned against (on the H200, TPE's
        # first DiT trial ran 3.2 minutes for 0.16 images/s, 30x slower than the reference).
        ref = study.user_attrs.get("fluxtune_reference") or {}
        ref_latency = ref.get("latency_s")
        if self.objective == "latency":
            # The steady per-call latency (the projection is steady too; latency_s may amortise a compile).
            steady = [(t.user_attrs.get("measurement") or {}).get("latency_s") or t.user_attrs.get("latency_s")
                      for t in done]
            best = min((v for v in [*steady, ref_latency] if v), default=None)
            return best * self.margin if best else None
        if self.objective == "throughput":
            rates = [t.user_attrs["throughput"] for t in done if t.user_attrs.get("throughput")]
            if ref_latency:
                rates.append(int(ref.get("images_per_call") or 1) / ref_latency)
            rate = max(rates, default=None)
            return images_per_call / rate * self.margin if rate else None
        return None

    def prune(self, study: optuna.Study, trial: optuna.trial.FrozenTrial) -> bool:
        step = trial.last_step
        if step is None:
            return False
        limit = self.threshold(study, int(trial.user_attrs.get("images_per_call") or 1))
        return limit is not None and trial.intermediate_values[step] > limit

