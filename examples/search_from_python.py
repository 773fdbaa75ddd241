"""Run a budget-constrained search from Python and apply the winner.

    python examples/search_from_python.py            # tiny built-in model on CPU, a handful of trials
"""

from __future__ import annotations

import argparse
from pathlib import Path

import fluxtune
from fluxtune import pipelines
from fluxtune.search import Search, SearchConfig, profile_of


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--model", default="tiny-flux")
    parser.add_argument("--trials", type=int, default=4)
    parser.add_argument("--home", default=".fluxtune")
    args = parser.parse_args(argv)

    base = fluxtune.load_profile({"name": "base", "family": "flux", "generation": {"steps": 4}})
    config = SearchConfig(
        model=args.model,
        base=base,
        workload={"prompts": ["a red circle at the top left on a blue background"], "runs": 2, "warmup": 1},
        budget_bytes=12 * 10**9,  # on a CPU-only machine the budget bounds host memory
        objective="latency",
        min_psnr=20.0,  # quality floor against the lossless reference
        trials=args.trials,
        study="example-search",
        narrow={"cache": ["none", "first_block"]},  # pin or narrow any dimension
        home=Path(args.home),
    )
    result = Search(config).run()
    if result.best is None:
        print("no feasible profile found")
        return
    best = profile_of(result.best, result.study, name="example-best")
    print(fluxtune.presets.to_yaml(best))

    pipe = pipelines.load(args.model)
    print(fluxtune.apply(best, pipe))


if __name__ == "__main__":
    main()
