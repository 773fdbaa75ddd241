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
    from fluxtune.cli import checks
    from fluxtune.cli.search import _print_table, print_best
    from fluxtune.errors import ProfileError
    from fluxtune.search.study import CONFIG_KEY, check_study_name, open_storage, study_dir

    check_study_name(args.study)
    home = Path(args.home)
    url = checks.storage(args.storage)
    journal = Path(url.removeprefix("journal:")) if url and "://" not in url else home / "journal.log"
    if (url is None or "://" not in url) and not journal.is_file():
        # Reading must not create: no journal here means no studies here.
        raise ProfileError(f"study {args.study!r} not found: there is no journal {journal}; pass the --home "
                           "(or --storage) the search used")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(url, home)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if args.study not in names:
        raise ProfileError(f"study {args.study!r} not found; studies here: {', '.join(names) or 'none'}")
    study = optuna.load_study(study_name=args.study, storage=storage)
    folder = study_dir(args.study, home)
    checks.writable("--home", folder / "trials.csv")
    files = report.build(study, folder)
    cfg = study.user_attrs.get(CONFIG_KEY, {})
    on_gpu = any(str(d).startswith("cuda") for d in cfg.get("devices", []))
    _print_table(study, cfg.get("budget_bytes"), on_gpu)
    print_best(study)
    for key, path in files.items():
        print(f"  {key}: {path}")
    return 0
