"""The one exception hierarchy of fluxtune.

Every message says what is wrong, the offending value, and what would work.
"""

from __future__ import annotations


class FluxtuneError(Exception):
    """Base class of every error fluxtune raises on purpose."""


class ProfileError(FluxtuneError, ValueError):
    """A profile (or an override of one) is malformed or invalid."""


class IncompatibleKnobsError(ProfileError):
    """Knobs that are valid alone do not combine, or do not exist on this pipeline."""


class BudgetExceededError(FluxtuneError, RuntimeError):
    """A run would need (or needed) more memory, pixels or images than the profile allows."""


class UnsupportedHardwareError(FluxtuneError, RuntimeError):
    """The profile needs something this machine lacks (a GPU, fp8 support, ...)."""


class MissingDependencyError(FluxtuneError, ImportError):
    """An optional package a knob needs is not installed."""


class PipelineError(FluxtuneError, ValueError):
    """A model spec cannot be loaded or built."""


class SearchError(FluxtuneError, RuntimeError):
    """A search cannot start or cannot continue."""


class FluxtuneWarning(UserWarning):
    """Something the user should know that does not stop the run (e.g. a profile measured elsewhere)."""
