"""Small results remembered on disk between processes (``~/.cache/fluxtune``, or ``$XDG_CACHE_HOME``).

Counting a FLUX.1-dev replica's work or facts means building it on the meta device and tracing it:
seconds of imports and Python that ``fluxtune presets --gpu`` and ``predict`` would pay on every call.
Entries are keyed by what they depend on (model, workload, the counting code, diffusers and transformers
versions) and written
atomically; an unreadable or stale entry is computed again.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import json
import os
from collections.abc import Callable
from importlib.metadata import PackageNotFoundError, version
from pathlib import Path
from typing import Any, TypeVar

T = TypeVar("T")


def cache_dir() -> Path:
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "fluxtune"


@functools.cache
def _versions() -> str:
    out = []
    for dist in ("diffusers", "transformers"):
        try:
            out.append(f"{dist}{version(dist)}")
        except PackageNotFoundError:
            out.append(f"{dist}-none")
    # The code that counts, not only the version number: a change between releases counts again.
    here = Path(__file__).parent
    digest = hashlib.sha1()
    for name in ("predict.py", "memory/facts.py", "pipelines.py", "tuning/layerwise.py"):
        with contextlib.suppress(OSError):
            digest.update((here / name).read_bytes())
    out.append(digest.hexdigest()[:10])
    return "-".join(out)


def remembered(kind: str, key: str, compute: Callable[[], T], encode: Callable[[T], Any],
               decode: Callable[[Any], T]) -> T:
    """``compute()``, or what an earlier process stored under (``kind``, ``key``) for these library versions."""
    path = cache_dir() / kind / f"{key}-{_versions()}.json"
    try:
        return decode(json.loads(path.read_text()))
    except (OSError, ValueError, TypeError, KeyError):
        pass  # not there yet, or written by an older layout
    value = compute()
    with contextlib.suppress(OSError):  # a read-only home: compute again next time
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        tmp.write_text(json.dumps(encode(value)))
        tmp.replace(path)
    return value
