"""fluxtune report STUDY: rebuild a study's tables, plots and image grid from its storage."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("study", help="study name (see .fluxtune/ or your storage)")
    p.add_argument("--storage", default=None, help="Optuna storage URL (default: the journal in --home)")
    p.add_argument("--home", default=".fluxtune", help="folder of the default journal and study folders")


def run(args: argparse.Namespace) -> int:
    from fluxtune.cli import checks
    from fluxtune.cli.search import _print_table, print_best
    from fluxtune.search import build_report, load_existing, study_dir
    from fluxtune.search.study import CONFIG_KEY, check_study_name

    check_study_name(args.study)
    home = Path(args.home)
    study = load_existing(args.study, checks.storage(args.storage), home)  # reading never creates a journal
    folder = study_dir(args.study, home)
    checks.writable("--home", folder / "trials.csv")
    files = build_report(study, folder)
    cfg = study.user_attrs.get(CONFIG_KEY, {})
    on_gpu = any(str(d).startswith("cuda") for d in cfg.get("devices", []))
    _print_table(study, cfg.get("budget_bytes"), on_gpu)
    print_best(study)
    for key, path in files.items():
        print(f"  {key}: {path}")
    return 0
