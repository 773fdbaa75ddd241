"""fluxtune: measured, budget-constrained profiles for diffusion transformer pipelines.

``import fluxtune`` stays light (no torch); the heavy parts load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

# The package face registers the in-repo mini models as built-ins: the registry (pipelines) never
# imports its plugins, so the two modules do not import each other.
import fluxtune.minimodels  # noqa: F401
from fluxtune import quiet as _quiet
from fluxtune.errors import (
    BudgetExceededError,
    FluxtuneError,
    FluxtuneWarning,
    IncompatibleKnobsError,
    MissingDependencyError,
    PipelineError,
    ProfileError,
    UnsupportedHardwareError,
)
from fluxtune.presets import list_presets, load_profile, save_profile
from fluxtune.profile import Profile

_quiet.from_env()  # a worker process of the quiet CLI: before torch and the libraries are imported

if TYPE_CHECKING:
    from fluxtune.tuning import ApplyReport

__version__ = "0.1.0"
__all__ = [
    "BudgetExceededError",
    "FluxtuneError",
    "FluxtuneWarning",
    "IncompatibleKnobsError",
    "MissingDependencyError",
    "PipelineError",
    "Profile",
    "ProfileError",
    "UnsupportedHardwareError",
    "apply",
    "last_report",
    "list_presets",
    "load",
    "load_profile",
    "save_profile",
    "set_loras",
]


def apply(profile: Any, pipe: Any, **kwargs: Any) -> ApplyReport:
    """Make ``pipe`` obey ``profile``; see :func:`fluxtune.tuning.apply`."""
    from fluxtune.tuning import apply as _apply

    return _apply(profile, pipe, **kwargs)


def load(model: str, profile: Any, **kwargs: Any) -> Any:
    """Load ``model`` (a save_pretrained directory or hub id) straight into the form and place ``profile``
    gives it, with no full host copy of the weights; see :func:`fluxtune.loading.load`."""
    from fluxtune.loading import load as _load

    return _load(model, profile, **kwargs)


def last_report(pipe: Any) -> ApplyReport | None:
    """What the last ``apply``/``load`` did to ``pipe`` (None: not tuned). (Not ``report``: that name
    is the ``fluxtune.report`` module.)"""
    from fluxtune.tuning.state import call_state

    state = call_state(pipe)
    return state.report if state is not None else None


def set_loras(pipe: Any, loras: Any) -> ApplyReport:
    """Switch the LoRAs of a tuned pipeline, keeping every other knob; see :func:`fluxtune.lora.set_loras`."""
    from fluxtune.lora import set_loras as _set_loras

    return _set_loras(pipe, loras)
