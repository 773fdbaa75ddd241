"""fluxtune report STUDY: rebuild a study's tables, plots and image grid from its storage."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="study name (see .fluxtune/ or your storage)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: the journal in --home)")
    p.add_argument("--home", default=".fluxtune", help="folder of the default journal and study folders")


def run(args: argparse.Namespace) -> int:
    from fluxtune.search import build_report, load_existing, study_dir

    home = Path(args.home)
    study = load_existing(args.study, args.storage, home)
    files = build_report(study, study_dir(args.study, home))
    for key, path in files.items():
        print(f"{key}: {path}")
    return 0
