"""Checks of command-line values that run before any work: each bad value is one line naming the flag,
the value and a fix (a ``ProfileError``: exit 2), and nothing is loaded, created or written first."""

from __future__ import annotations

import contextlib
import math
import os
import re
from pathlib import Path
from typing import Any

from fluxtune.errors import ProfileError


def positive_int(flag: str, value: int | None, *, zero: bool = False, example: str = "3") -> None:
    """``value`` is None or an integer >= 1 (>= 0 when ``zero``)."""
    if value is None:
        return
    low = 0 if zero else 1
    if value < low:
        raise ProfileError(f"{flag} {value}: use {'0 or more' if zero else 'a positive count'}, e.g. {flag} {example}")


def positive_float(flag: str, value: float | None, *, zero: bool = False, example: str = "5") -> None:
    """``value`` is None or a finite number > 0 (>= 0 when ``zero``)."""
    if value is None:
        return
    if not math.isfinite(value) or value < 0 or (value == 0 and not zero):
        raise ProfileError(f"{flag} {value}: use a finite number {'>= 0' if zero else '> 0'}, e.g. {flag} {example}")


def model(spec: str) -> None:
    """A built-in name, a directory written by ``save_pretrained`` or a hub id, checked without loading."""
    from fluxtune import pipelines

    if pipelines.builtin(spec) is not None:
        return
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        if not os.path.isfile(os.path.join(path, "model_index.json")):
            raise ProfileError(f"--model {spec!r}: the directory has no model_index.json; pass a folder written by "
                               "save_pretrained (or a built-in such as flux-mini)")
        return
    if os.path.exists(path):
        raise ProfileError(f"--model {spec!r} is a file; pass the directory written by save_pretrained "
                           "(single-file checkpoints are not supported) or a built-in such as flux-mini")
    if pipelines._HUB_ID_RE.match(spec) and not spec.startswith("."):
        return
    names = ", ".join(s.name for s in pipelines.list_builtins())
    raise ProfileError(f"--model {spec!r} is neither a built-in, a directory nor a hub id (org/name); "
                       f"built-ins: {names}")


def dtype(value: str | None) -> None:
    """``--dtype``: bfloat16/bf16, float16/fp16, float32/fp32."""
    if value is None:
        return
    from fluxtune.pipelines import _DTYPES

    if str(value).strip().lower().removeprefix("torch.") not in _DTYPES:
        raise ProfileError(f"--dtype {value!r}: use bfloat16 (bf16), float16 (fp16) or float32 (fp32)")


def device_index(value: str | None, default: str) -> str:
    """``--device`` as a worker takes it: ``cuda`` means ``cuda:0`` (a worker needs the index); None = ``default``."""
    return {"cuda": "cuda:0"}.get(value or "", value) or default


def device(value: str | None) -> None:
    """``--device``: cpu, cuda or cuda:N, and a GPU that exists here."""
    if value is None:
        return
    if not re.fullmatch(r"cpu|cuda(:\d+)?", value.strip()):
        raise ProfileError(f"--device {value!r}: use cpu, cuda or cuda:N (e.g. cuda:0)")
    if value.startswith("cuda"):
        import torch

        n = torch.cuda.device_count() if torch.cuda.is_available() else 0
        index = int(value.split(":")[1]) if ":" in value else 0
        if index >= n:
            raise ProfileError(f"--device {value!r}: this machine has "
                               f"{f'{n} CUDA GPU(s) (cuda:0..cuda:{n - 1})' if n else 'no CUDA GPU'}; "
                               f"use {'cpu' if not n else 'cuda:0'}")


def storage(url: str | None) -> str | None:
    """``--storage``: a journal file or a database URL; returns it with ``postgresql://`` mapped to the
    psycopg 3 driver the ``postgres`` extra installs."""
    if url is None:
        return None
    from fluxtune.search.study import normalize_storage_url

    return normalize_storage_url(url)


def writable(flag: str, path: str | Path | None) -> None:
    """The output ``path`` can be written (checked before the work that produces it)."""
    if path is None:
        return
    from fluxtune.presets import check_writable

    check_writable(path, flag)


def lora_file(path: str) -> None:
    """``--lora FILE``: an existing, readable .safetensors file holding LoRA weights."""
    p = Path(path)
    if not p.name.endswith(".safetensors"):
        raise ProfileError(f"--lora {path!r} is not a .safetensors file; fluxtune never loads pickled LoRAs, "
                           "convert it to safetensors")
    if not p.is_file():
        raise ProfileError(f"--lora {path!r}: no such file; give the path of a .safetensors LoRA file")
    try:
        from safetensors import safe_open

        with safe_open(str(p), framework="pt") as f:
            keys = list(f.keys())
    except Exception as e:  # safetensors raises its own error type, OSError, ValueError ...
        raise ProfileError(f"--lora {path!r}: not a readable safetensors file ({str(e).splitlines()[0]}); "
                           "pass a LoRA saved as .safetensors") from None
    if not any(k for k in keys if "lora" in k.lower()):
        raise ProfileError(f"--lora {path!r}: none of its {len(keys)} tensors is a LoRA weight (lora_A/lora_B); "
                           "pass a LoRA file, not a model checkpoint")


def finite_choice(flag: str, value: Any, allowed: tuple[Any, ...]) -> None:
    if value not in allowed:
        raise ProfileError(f"{flag} {value!r}: use one of {', '.join(map(str, allowed))}")


def true_cfg(model_spec: str, family: str, generation: Any) -> None:
    """The profile's true-CFG settings (``generation.negative_prompt``/``true_cfg_scale``) suit the model's
    pipeline class, checked from its ``__call__`` signature before any weight loads (apply checks again)."""
    if generation.negative_prompt is None and generation.true_cfg_scale is None:
        return
    import json

    from fluxtune.pipelines import FAMILY_PIPELINES
    from fluxtune.tuning.generation import pipeline_call_params, true_cfg_problem

    names: tuple[str, ...] = FAMILY_PIPELINES.get(family, ())
    index = Path(os.path.expanduser(model_spec)) / "model_index.json"
    if index.is_file():
        with contextlib.suppress(OSError, ValueError, AttributeError):
            names = (str(json.loads(index.read_text()).get("_class_name", "")),)
    problems = []
    for name in names:
        params = pipeline_call_params(name)
        if params is None:
            return  # a class this diffusers lacks: apply reports what is wrong
        problem = true_cfg_problem(params, generation, " / ".join(names))
        if problem is None:
            return
        problems.append(problem)
    if problems:
        raise ProfileError(problems[0])
