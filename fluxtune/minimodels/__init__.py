"""Mini models trained by the project itself: flux-mini (FluxPipeline) and dit-mini (DiTPipeline).

They draw 64x64 pictures of coloured shapes (`domain.py`), so quality measurements on them mean
something (unlike random-weight replicas), and `adherence.py` scores a picture against its prompt
without any downloaded network. See README.md in this folder for what they are and are not.

Importing this package registers the built-ins "flux-mini" and "dit-mini" with
`fluxtune.pipelines` and imports no torch; the checkpoints load on first use.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fluxtune.errors import PipelineError

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

# FLUXTUNE_MINIMODELS_DIR points the built-ins at retrained checkpoints without touching the package.
CHECKPOINT_DIR = Path(
    os.environ.get("FLUXTUNE_MINIMODELS_DIR") or Path(__file__).resolve().parent / "checkpoints"
)
FLUX_MINI_DIR = CHECKPOINT_DIR / "flux-mini"
DIT_MINI_DIR = CHECKPOINT_DIR / "dit-mini"
TRAIN_COMMAND = "python scripts/train_minimodels.py --out fluxtune/minimodels/checkpoints"

__all__ = [
    "CHECKPOINT_DIR",
    "DIT_MINI_DIR",
    "FLUX_MINI_DIR",
    "TRAIN_COMMAND",
    "checkpoint_available",
    "load_dit_mini",
    "load_flux_mini",
]


def checkpoint_available(name: str, root: str | Path | None = None) -> bool:
    """True when the trained checkpoint `name` ("flux-mini" or "dit-mini") is present."""
    return (Path(root or CHECKPOINT_DIR) / name / "model_index.json").is_file()


def _load(
    name: str, device: str | torch.device | None, dtype: str | torch.dtype, path: str | Path | None
) -> Any:
    from fluxtune.pipelines import parse_dtype

    where = Path(path) if path is not None else CHECKPOINT_DIR / name
    if not (where / "model_index.json").is_file():
        raise PipelineError(
            f"the {name} checkpoint is missing (no model_index.json in {where}); train it with "
            f"`{TRAIN_COMMAND}` (about 7 minutes on one GPU)"
        )
    from diffusers import DiffusionPipeline

    # The same path as a real model: a save_pretrained directory through from_pretrained.
    pipe = DiffusionPipeline.from_pretrained(str(where), local_files_only=True, dtype=parse_dtype(dtype))
    if device is not None:
        pipe.to(device)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def load_flux_mini(
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "float32",
    *,
    path: str | Path | None = None,
) -> DiffusionPipeline:
    """Load the trained flux-mini FluxPipeline (64x64; call it with height=64, width=64).

    Args:
        device: where to put it (None: CPU).
        dtype: float32 (default, the reference), bfloat16 or float16.
        path: another checkpoint directory (default: the one shipped in the package).

    Raises:
        PipelineError: the checkpoint is missing (the message says how to train it) or a bad dtype.
    """
    return _load("flux-mini", device, dtype, path)


def load_dit_mini(
    device: str | torch.device | None = None,
    dtype: str | torch.dtype = "float32",
    *,
    path: str | Path | None = None,
) -> DiffusionPipeline:
    """Load the trained dit-mini DiTPipeline (64x64, classes like "red circle" via `pipe.get_label_ids`).

    Args:
        device: where to put it (None: CPU).
        dtype: float32 (default, the reference), bfloat16 or float16.
        path: another checkpoint directory (default: the one shipped in the package).

    Raises:
        PipelineError: the checkpoint is missing (the message says how to train it) or a bad dtype.
    """
    return _load("dit-mini", device, dtype, path)


def _register() -> None:
    from fluxtune.pipelines import BuiltinSpec, register_builtin

    register_builtin(
        BuiltinSpec(
            "flux-mini",
            "flux",
            "FluxPipeline trained in-repo on coloured shapes (64x64, ~2M params, CPU): real learned weights "
            "for quality studies; prompts like 'a large red circle at the top left on a blue background'",
            load_flux_mini,
            # Trained at 64x64 with T5 text padded to 96-512 tokens: 96 draws the same, ~4x faster on CPU.
            generation={"height": 64, "width": 64, "max_sequence_length": 96},
            dtype="float32",
        ),
        replace=True,
    )
    register_builtin(
        BuiltinSpec(
            "dit-mini",
            "dit",
            "DiTPipeline trained in-repo on coloured shapes (64x64, 40 classes such as 'red circle', CPU)",
            load_dit_mini,
            dtype="float32",
        ),
        replace=True,
    )


_register()
