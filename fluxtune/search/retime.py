"""Finalists re-timed interleaved with the baseline, so the search names a winner only beyond noise.

A trial's latency comes from a couple of timed calls made minutes apart from its rivals', on a machine
whose speed drifts (clocks, other processes, a busy 2-core CI box): the README's CPU search once named a
"best" 0.76x the speed of the reference it claimed to beat. At the end of a search the top finalists
and the fastest diffusers recipe that fit (the baseline) are measured again in rounds, A B C, B C A,
..., each visit a fresh apply and warm call in the same worker, so drift hits all of them alike. The
winner is the finalist with the best median over the rounds; it is said to beat the baseline only by
more than the larger of the two's spread between rounds.

The record is kept in the study (``fluxtune_retime``) with the number of finished trials it covers:
:func:`fluxtune.search.results.best_trial` follows it until a later trial finishes.
"""

from __future__ import annotations

import statistics
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from fluxtune.status import Status

RECORD_KEY = "fluxtune_retime"
FINALISTS = 3
"""The best trials re-timed against the baseline."""


@dataclass
class Candidate:
    """One finalist (or the baseline) and what the rounds measured."""

    trial: int
    label: str
    profile: Any
    values: list[float] = field(default_factory=list)
    """One per round: seconds per call (latency objective) or images per second (throughput)."""

    @property
    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None

    @property
    def spread(self) -> float:
        return max(self.values) - min(self.values) if len(self.values) > 1 else 0.0


def candidates(study: Any, objective: str, k: int = FINALISTS) -> tuple[list[Candidate], Candidate | None]:
    """The ``k`` best distinct feasible trials and the fastest feasible recipe not among them (None when
    the study ran no recipe). Only the latency and throughput objectives are re-timed."""
    from fluxtune.profile import validate_profile
    from fluxtune.search.results import feasible_trials

    if objective not in ("latency", "throughput"):
        return [], None
    # Repeats of a configuration carry duplicate_of (the runner's _repeat): what is left is distinct.
    top = [t for t in feasible_trials(study) if t.user_attrs.get("duplicate_of") is None]
    top.sort(key=lambda t: t.values[0], reverse=objective == "throughput")

    def cand(t: Any) -> Candidate:
        return Candidate(t.number, f"trial {t.number + 1}",
                         validate_profile(t.user_attrs["profile"], source=f"trial {t.number + 1}"))

    finalists = [cand(t) for t in top[:k]]
    base = next((t for t in top if str(t.user_attrs.get("source", "")).startswith("recipe")), None)
    if base is None:
        return finalists, None
    baseline = next((c for c in finalists if c.trial == base.number), None) or cand(base)
    baseline.label += f" (baseline: {str(base.user_attrs['source'])[7:]})"
    return finalists, baseline


def run_rounds(cands: list[Candidate], rounds: int, measure_one: Callable[[Candidate], float | None],
               say: Callable[[str], None], time_left: Callable[[], float | None] | None = None,
               visit_s: float | None = None) -> int:
    """Measure every candidate once per round, each round starting one later (A B C, B C A, ...).
    Stops before a round that ``time_left`` (seconds, or None: no limit) cannot fit at ``visit_s`` per
    visit. Returns the rounds completed."""
    done = 0
    for r in range(rounds):
        left = time_left() if time_left is not None else None
        if left is not None and visit_s is not None and left < visit_s * len(cands):
            say(f"re-timing: stopped before round {r + 1} (about {visit_s * len(cands):.0f}s needed, {left:.0f}s left)")
            break
        order = cands[r % len(cands):] + cands[:r % len(cands)]
        for c in order:
            value = measure_one(c)
            if value is not None:
                c.values.append(value)
        done += 1
    return done


def verdict(finalists: list[Candidate], baseline: Candidate | None, objective: str) -> tuple[Candidate | None, str]:
    """The winner (best median over the rounds) and one line on whether it beat the baseline beyond noise."""
    measured = [c for c in finalists if c.values]
    if not measured:
        return None, "re-timing: no finalist could be measured again; the search's own best stands"
    better = (lambda a, b: a < b) if objective == "latency" else (lambda a, b: a > b)
    winner = measured[0]
    for c in measured[1:]:
        if better(c.median, winner.median):  # type: ignore[arg-type]
            winner = c
    unit = "s" if objective == "latency" else " images/s"
    won = f"{winner.label} {winner.median:.3f}{unit} (rounds spread {winner.spread:.3f}{unit})"
    if baseline is None or not baseline.values:
        return winner, f"re-timed winner: {won}; no diffusers recipe fitted to compare with"
    if baseline is winner:
        return winner, f"re-timed: the baseline {won} is the fastest; nothing beat it"
    noise = max(winner.spread, baseline.spread)
    gap = abs(winner.median - baseline.median)  # type: ignore[operator]
    base = f"{baseline.label} {baseline.median:.3f}{unit}"
    if gap <= noise:
        return winner, (f"re-timed: {won} against {base}: within the rounds' noise ({noise:.3f}{unit}); nothing beat "
                        "the baseline beyond noise")
    ratio = (baseline.median / winner.median if objective == "latency"  # type: ignore[operator]
             else winner.median / baseline.median)  # type: ignore[operator]
    return winner, f"re-timed: {won} is {ratio:.2f}x the baseline {base}, beyond the rounds' noise ({noise:.3f}{unit})"


def record(study: Any, finalists: list[Candidate], baseline: Candidate | None, winner: Candidate | None,
           line: str, rounds: int, finished: int) -> None:
    """Keep the rounds in the study: the report and ``best_trial`` read them."""
    every = finalists + ([baseline] if baseline is not None and baseline not in finalists else [])
    study.set_user_attr(RECORD_KEY, {
        "finished": finished, "rounds": rounds, "verdict": line,
        "winner": winner.trial if winner is not None else None,
        "values": {str(c.trial): c.values for c in every},
        "labels": {str(c.trial): c.label for c in every},
    })


def recorded_winner(study: Any, finished: int) -> int | None:
    """The re-timed winner's trial number, if the record covers every finished trial."""
    rec = study.user_attrs.get(RECORD_KEY)
    if not rec or rec.get("finished") != finished:
        return None
    winner = rec.get("winner")
    return int(winner) if winner is not None else None


def measured_value(outcome: Any, objective: str) -> float | None:
    """A re-timing visit's figure: seconds per call, or images per second."""
    m = outcome.measurement
    if outcome.status != Status.OK or m is None or not m.latency_s:
        return None
    if objective == "latency":
        return float(m.latency_s)
    return float((m.images_per_call or 1) / m.latency_s)
