"""Silence third-party noise on the command line (and in its worker processes) unless ``--debug``.

Without this every command starts with about seven lines from libraries: torchao's ``Failed to load
... .so`` and ``Unable to import torchao Tensor objects``, torch's ``_pytree`` Enum deprecations,
transformers' torchvision notes, diffusers' loading progress bars and its ``id2label`` type note.
fluxtune's own warnings (:class:`fluxtune.errors.FluxtuneWarning`) and errors still show.

The CLI sets ``FLUXTUNE_QUIET=1`` in its environment, so worker processes it starts inherit it and
call :func:`quiet` when they import fluxtune; a library user's logging is left alone.
"""

from __future__ import annotations

import logging
import os
import warnings

ENV = "FLUXTUNE_QUIET"
_LOGGERS = ("torchao", "torch.utils._pytree", "torch._dynamo", "torch._inductor", "diffusers", "transformers",
            "accelerate", "huggingface_hub", "peft", "optuna", "bitsandbytes")
_ENV = {
    "TRANSFORMERS_VERBOSITY": "error",
    "DIFFUSERS_VERBOSITY": "error",
    "TRANSFORMERS_NO_ADVISORY_WARNINGS": "1",
    "HF_HUB_DISABLE_PROGRESS_BARS": "1",
    "TQDM_DISABLE": "1",  # diffusers' "Loading pipeline components..." bar
}
_MODULES = r"(torch|torchao|diffusers|transformers|accelerate|huggingface_hub|peft|optuna|torchmetrics|timm|bitsandbytes)(\.|$)"


def quiet() -> None:
    """Turn library logging down to errors, library warnings off, and tqdm bars off (this process
    and the ones it starts)."""
    os.environ[ENV] = "1"
    # Read at import by the libraries (and inherited by worker processes).
    for key, value in _ENV.items():
        os.environ.setdefault(key, value)
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", module=_MODULES)
    warnings.filterwarnings("ignore", category=FutureWarning, module=_MODULES)
    # Already-imported libraries read their verbosity once: set it directly too.
    import sys

    for mod in ("diffusers.utils.logging", "transformers.utils.logging"):
        m = sys.modules.get(mod)
        if m is not None:
            m.set_verbosity_error()  # type: ignore[attr-defined]


def loud() -> None:
    """``--debug``: the libraries speak (undoing :func:`quiet`, which ``import fluxtune`` may have run
    in a process started by a quiet one), and worker processes are told so."""
    os.environ.pop(ENV, None)
    for key, value in _ENV.items():
        if os.environ.get(key) == value:
            del os.environ[key]
    for name in _LOGGERS:
        logging.getLogger(name).setLevel(logging.NOTSET)
    warnings.filters[:] = [f for f in warnings.filters if getattr(f[3], "pattern", None) != _MODULES]  # type: ignore[index]
    import sys

    for mod in ("diffusers.utils.logging", "transformers.utils.logging"):
        m = sys.modules.get(mod)
        if m is not None:
            m.set_verbosity_warning()  # type: ignore[attr-defined]


def from_env() -> None:
    """Called on ``import fluxtune``: quiet in a process the quiet CLI started."""
    if os.environ.get(ENV) == "1":
        quiet()
