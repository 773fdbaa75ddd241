"""Studies and their storage: an Optuna journal file under ``.fluxtune/`` by default, any Optuna
storage URL otherwise (``postgresql://...`` lets many hosts share one study). Re-running the same
command resumes the study; trials a killed process left RUNNING are marked failed first."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

from fluxtune.errors import SearchError

HOME = Path(".fluxtune")
CONFIG_KEY = "fluxtune_config"
FACTS_KEY = "fluxtune_facts"
# Config keys that must match to resume a study (others, like --trials, may change between runs).
IDENTITY = ("model", "budget_bytes", "objective", "workload", "space", "min_psnr", "max_latency", "images")


def study_dir(name: str, home: Path = HOME) -> Path:
    """Where a study keeps its reference, images and reports."""
    return home / re.sub(r"[^A-Za-z0-9_.-]+", "_", name)


def open_storage(url: str | None, home: Path = HOME) -> Any:
    """An Optuna storage: the journal file ``.fluxtune/journal.log`` when ``url`` is None."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if url is None or url.startswith("journal:") or url.endswith(".log"):
        path = Path(url.removeprefix("journal:")) if url else home / "journal.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    if "://" not in url:
        raise SearchError(f"--storage {url!r} is not a storage URL; use e.g. postgresql://user@host/db, "
                          "sqlite:///file.db or journal:path.log")
    try:
        # The heartbeat lets another host see that this one died and fail its trials.
        return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180)
    except Exception as e:
        raise SearchError(f"--storage {url}: cannot open: {str(e).splitlines()[0]}") from None


def directions(objective: str) -> list[Any]:
    """Optuna directions for an objective: latency min, quality (PSNR) max, or both."""
    return {"latency": ["minimize"], "quality": ["maximize"], "pareto": ["minimize", "maximize"]}[objective]


def create_or_resume(name: str, storage: Any, config: dict[str, Any], sampler: Any) -> tuple[Any, bool]:
    """Open study ``name``; create it with ``config`` or check that an existing one matches.

    Returns:
        (study, resumed)

    Raises:
        SearchError: the study exists with a different budget/model/objective/workload.
    """
    import optuna

    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
    study = optuna.create_study(study_name=name, storage=storage, directions=directions(config["objective"]),
                                sampler=sampler, load_if_exists=True)
    if name in existing:
        old = study.user_attrs.get(CONFIG_KEY, {})
        diff = [k for k in IDENTITY if json.dumps(old.get(k), sort_keys=True) != json.dumps(config.get(k), sort_keys=True)]
        if diff:
            k = diff[0]
            raise SearchError(
                f"study {name!r} already exists with {k}={old.get(k)!r} (now {config.get(k)!r}); "
                f"resume it with the same arguments or pass --study NEW_NAME"
            )
        fail_stale(study)
        return study, True
    study.set_user_attr(CONFIG_KEY, config)
    return study, False


def fail_stale(study: Any) -> int:
    """Mark trials left RUNNING by a killed process as FAIL (journal storage has no heartbeat)."""
    import optuna
    from optuna.trial import TrialState

    storage = study._storage
    if isinstance(storage, optuna.storages.RDBStorage):
        return len(optuna.storages.fail_stale_trials(study) or [])  # type: ignore[func-returns-value]
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("host_pid") and not _alive(t.user_attrs["host_pid"]):
            storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
            n += 1
    return n


def _alive(host_pid: str) -> bool:
    import os
    import socket

    host, _, pid = str(host_pid).rpartition(":")
    if host != socket.gethostname():
        return True  # another host's trial: not ours to judge
    try:
        os.kill(int(pid), 0)
    except (OSError, ValueError):
        return False
    return True
