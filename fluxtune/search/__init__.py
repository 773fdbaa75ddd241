"""``fluxtune search``: ask Optuna for profiles, run each in a worker, keep the study.

Callers import from here; the modules behind it (runner, space, objective, results, study, recipes,
report) are the search's own. Optuna is imported in this package only.
"""

from __future__ import annotations

from fluxtune.search.report import build as build_report
from fluxtune.search.results import best_so_far, best_trial, pareto_front, profile_of, rows
from fluxtune.search.runner import Search, SearchConfig, SearchResult
from fluxtune.search.space import SearchSpace, load_space_file, parse_pins
from fluxtune.search.study import load_existing, open_storage, study_dir

__all__ = ["Search", "SearchConfig", "SearchResult", "SearchSpace", "best_so_far", "best_trial", "build_report",
           "load_existing", "load_space_file", "open_storage", "pareto_front", "parse_pins", "profile_of", "rows",
           "study_dir"]
