"""fluxtune report STUDY: rebuild a study's tables, plots and image grid from its storage."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="study name (see .fluxtune/ or your storage)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: the journal in --home)")
    p.add_argument("--home", default=".fluxtune", help="folder of the default journal and study folders")


def run(args: argparse.Namespace) -> int:
    import optuna

    from fluxtune import report
    from fluxtune.errors import ProfileError
    from fluxtune.search.study import open_storage, study_dir

    home = Path(args.home)
    storage = open_storage(args.storage, home)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if args.study not in names:
        raise ProfileError(f"study {args.study!r} not found; studies here: {', '.join(names) or 'none'}")
    study = optuna.load_study(study_name=args.study, storage=storage)
    files = report.build(study, study_dir(args.study, home))
    for key, path in files.items():
        print(f"{key}: {path}")
    return 0
