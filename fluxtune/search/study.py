"""Studies and their storage: an Optuna journal file under ``.fluxtune/`` by default, any Optuna
storage URL otherwise (``postgresql://...`` lets many hosts share one study). Re-running the same
command resumes the study; trials a killed process left RUNNING are marked failed first."""

from __future__ import annotations

import contextlib
import json
import re
import warnings
from pathlib import Path
from typing import Any

from fluxtune.errors import ProfileError, SearchError

HOME = Path(".fluxtune")
CONFIG_KEY = "fluxtune_config"
FACTS_KEY = "fluxtune_facts"
# Config keys that must match to resume a study (others, like --trials, may change between runs).
IDENTITY = ("model", "budget_bytes", "objective", "workload", "space", "min_psnr", "max_latency", "images")


def check_study_name(name: str) -> str:
    """A study name that maps to a folder inside ``--home`` (not ``..``, not empty, not hidden).

    Raises:
        ProfileError: naming the value and the allowed form.
    """
    folder = re.sub(r"[^A-Za-z0-9_.-]+", "_", name)
    if not name.strip() or folder.strip(".") == "" or folder.startswith(".") or len(name) > 200:
        raise ProfileError(f"--study {name!r}: use a name of letters, digits, '_', '-' and '.' that does not start "
                           "with '.' (at most 200 characters), e.g. --study flux-12gb")
    return folder


def study_dir(name: str, home: Path = HOME) -> Path:
    """Where a study keeps its reference, images and reports (always a folder inside ``home``)."""
    return home / check_study_name(name)


def normalize_storage_url(url: str) -> str:
    """Check a ``--storage`` value and return the URL to open.

    ``journal:PATH`` or a ``*.log`` path is a journal file; anything else must be a database URL
    (``postgresql://user@host/db``, ``sqlite:///file.db``). ``postgresql://`` (and ``postgres://``) is
    mapped to the psycopg 3 driver the ``postgres`` extra installs (SQLAlchemy 2.1's default too), or to
    psycopg2 when only that is installed.

    Raises:
        ProfileError: not a journal path or a database URL (exit 2, before anything is created).
    """
    import importlib.util

    text = url.strip()
    if text.startswith("journal:") or (text.endswith(".log") and "://" not in text):
        if not text.removeprefix("journal:").strip():
            raise ProfileError(f"--storage {url!r}: journal: needs a file path, e.g. journal:.fluxtune/journal.log")
        return text
    hint = "use e.g. postgresql://user@host/db, sqlite:///file.db or journal:path.log"
    m = re.fullmatch(r"([A-Za-z][A-Za-z0-9+.-]*)://(.*)", text)
    if not m:
        raise ProfileError(f"--storage {url!r} is not a storage URL; {hint}")
    scheme, rest = m.group(1).lower(), m.group(2)
    try:
        from sqlalchemy.engine import make_url

        make_url(text)
    except Exception as e:  # sqlalchemy.exc.ArgumentError and friends
        raise ProfileError(f"--storage {url!r} is not a database URL ({str(e).splitlines()[0]}); {hint}") from None
    if scheme in ("postgresql", "postgres"):
        if importlib.util.find_spec("psycopg") is not None:
            return f"postgresql+psycopg://{rest}"
        if importlib.util.find_spec("psycopg2") is not None:
            return f"postgresql+psycopg2://{rest}"
        from fluxtune.errors import MissingDependencyError

        raise MissingDependencyError(f"--storage {url!r} needs a PostgreSQL driver: pip install 'fluxtune[postgres]' "
                                     "(psycopg 3)")
    if scheme == "sqlite" and rest not in ("", "/:memory:") and not rest.startswith("/"):
        raise ProfileError(f"--storage {url!r}: a SQLite URL has three slashes before a relative path, e.g. "
                           "sqlite:///study.db")
    if scheme == "sqlite" and rest.startswith("/") and rest != "/:memory:":
        folder = Path(rest[1:].split("?", 1)[0]).parent
        if not folder.is_dir():
            raise ProfileError(f"--storage {url!r}: the folder {str(folder)!r} does not exist; create it or use "
                               "e.g. sqlite:///study.db")
    return text


def open_storage(url: str | None, home: Path = HOME) -> Any:
    """An Optuna storage: the journal file ``.fluxtune/journal.log`` when ``url`` is None."""
    import optuna
    from optuna.storages.journal import JournalFileBackend

    if url is not None:
        url = normalize_storage_url(url)
    if url is None or url.startswith("journal:") or url.endswith(".log") and "://" not in url:
        path = Path(url.removeprefix("journal:")) if url else home / "journal.log"
        path.parent.mkdir(parents=True, exist_ok=True)
        return optuna.storages.JournalStorage(JournalFileBackend(str(path)))
    import time

    for attempt in range(5):
        try:
            # The heartbeat lets another host see that this one died and fail its trials.
            with warnings.catch_warnings():  # heartbeat_interval is "experimental"
                warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
                return optuna.storages.RDBStorage(url, heartbeat_interval=60, grace_period=180)
        except Exception as e:
            # Several hosts starting at once on an empty database race to create Optuna's tables
            # (PostgreSQL: duplicate key in pg_type); the loser finds them there on a second try.
            if attempt == 4 or "duplicate" not in str(e).lower() and "already exists" not in str(e).lower():
                raise SearchError(f"--storage {url}: cannot open: {str(e).splitlines()[0]}") from None
            time.sleep(0.5 * (attempt + 1))
    raise AssertionError("unreachable")


def load_existing(name: str, storage_url: str | None, home: Path = HOME) -> Any:
    """An existing study, for reading (``fluxtune report``).

    Raises:
        ProfileError: no study of that name in the storage; names the ones there.
    """
    import optuna

    url = normalize_storage_url(storage_url) if storage_url else None
    journal = Path(url.removeprefix("journal:")) if url and "://" not in url else home / "journal.log"
    if (url is None or "://" not in url) and not journal.is_file():
        # Reading must not create: no journal here means no studies here.
        raise ProfileError(f"study {name!r} not found: there is no journal {journal}; pass the --home "
                           "(or --storage) the search used")
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    storage = open_storage(url, home)
    names = [s.study_name for s in optuna.get_all_study_summaries(storage)]
    if name not in names:
        raise ProfileError(f"study {name!r} not found; studies here: {', '.join(names) or 'none'}")
    return optuna.load_study(study_name=name, storage=storage)


def directions(objective: str) -> list[Any]:
    """Optuna directions for an objective: latency min, quality (PSNR) max, both, or images/s max."""
    return {"latency": ["minimize"], "quality": ["maximize"], "pareto": ["minimize", "maximize"],
            "throughput": ["maximize"]}[objective]


def create_or_resume(name: str, storage: Any, config: dict[str, Any], sampler: Any,
                     pruner: Any = None) -> tuple[Any, bool]:
    """Open study ``name``; create it with ``config`` or check that an existing one matches.

    Returns:
        (study, resumed)

    Raises:
        ProfileError: the study exists with a different budget/model/objective/workload (bad input: exit 2).
    """
    import time

    import optuna

    existing = {s.study_name: s for s in optuna.get_all_study_summaries(storage)}
    study = optuna.create_study(study_name=name, storage=storage, directions=directions(config["objective"]),
                                sampler=sampler, pruner=pruner, load_if_exists=True)
    if name in existing:
        old = study.user_attrs.get(CONFIG_KEY, {})
        # A process on another host may have created the study a moment ago and not yet written its
        # config: wait for it rather than report a mismatch against nothing.
        deadline = time.monotonic() + 10.0
        while not old and time.monotonic() < deadline:
            time.sleep(0.2)
            old = study.user_attrs.get(CONFIG_KEY, {})
        if not old:  # created by a run that died before writing it: adopt the study
            study.set_user_attr(CONFIG_KEY, config)
            return study, False
        diff = [k for k in IDENTITY if json.dumps(old.get(k), sort_keys=True) != json.dumps(config.get(k), sort_keys=True)]
        if diff:
            k = diff[0]
            raise ProfileError(
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

    storage = study._storage  # an RDBStorage arrives wrapped in optuna's cache: no isinstance test
    # Storages with heartbeats (RDB) fail trials whose heartbeat went stale; a trial killed before
    # its first heartbeat has none, so the pid check below runs for every storage.
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", optuna.exceptions.ExperimentalWarning)
        optuna.storages.fail_stale_trials(study)
    n = 0
    for t in study.get_trials(deepcopy=False, states=(TrialState.RUNNING,)):
        if t.user_attrs.get("host_pid") and not _alive(t.user_attrs["host_pid"]):
            with contextlib.suppress(optuna.exceptions.UpdateFinishedTrialError):
                storage.set_trial_state_values(t._trial_id, TrialState.FAIL)
                n += 1
    return n


def running_elsewhere(trial: Any) -> bool:
    """Whether a RUNNING trial's process still lives (another host's: assumed so, it is not ours to judge)."""
    host_pid = trial.user_attrs.get("host_pid")
    return bool(host_pid) and _alive(host_pid)


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
