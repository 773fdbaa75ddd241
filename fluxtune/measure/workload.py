"""What a measurement renders: :class:`Workload`, and the default prompts and class labels."""

from __future__ import annotations

import dataclasses
import inspect
from dataclasses import dataclass
from typing import Any

from fluxtune.errors import FluxtuneError, ProfileError
from fluxtune.tuning.state import base_class

DEFAULT_PROMPTS = (
    "a red fox standing in fresh snow, soft morning light, photograph",
    "a bowl of ramen on a wooden table, steam rising, studio photo",
    "a lighthouse on a rocky cliff at dusk, oil painting",
    "a rainy city street at night with neon signs reflected in puddles",
)
DEFAULT_CLASS_LABELS = (207, 360, 387, 974)
"""ImageNet classes for DiT: golden retriever, otter, lesser panda, geyser."""



@dataclass(frozen=True)
class Workload:
    """What a measurement renders. ``None`` fields are left to the pipeline's defaults (which
    ``apply`` sets from the profile's generation section), so a measurement never overrides a profile.

    Each run renders every (prompt, seed) pair, one ``pipe()`` call each (text pipelines), or for DiT
    one call per seed with all class labels as the batch (each label ``images_per_prompt`` times).
    ``warmup`` untimed calls (first prompt, first seed) precede the ``runs`` timed repeats; with
    ``warmup_steps`` they run that many denoising steps instead of ``steps`` (the shapes, and so any
    compilation, are the same; an uncompiled offloading recipe needs no full warm-up call).
    """

    prompts: tuple[str, ...] = ()
    class_labels: tuple[int, ...] = ()
    seeds: tuple[int, ...] = (0,)
    steps: int | None = None
    guidance: float | None = None
    height: int | None = None
    width: int | None = None
    max_sequence_length: int | None = None
    images_per_prompt: int | None = None
    runs: int = 3
    warmup: int = 1
    warmup_steps: int | None = None

    def __post_init__(self) -> None:
        # Accept lists (from JSON/YAML) but store tuples, so a Workload is hashable and immutable.
        for name in ("prompts", "class_labels", "seeds"):
            object.__setattr__(self, name, tuple(getattr(self, name)))
        problems = []
        if not self.seeds:
            problems.append("seeds is empty; give at least one seed, e.g. [0]")
        if self.runs < 1:
            problems.append(f"runs={self.runs} must be >= 1")
        if self.warmup < 0:
            problems.append(f"warmup={self.warmup} must be >= 0")
        for name in ("steps", "height", "width", "max_sequence_length", "images_per_prompt", "warmup_steps"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < 1):
                problems.append(f"{name}={value!r} must be a positive integer or null")
        if self.prompts and self.class_labels:
            problems.append("set prompts (text pipelines) or class_labels (DiT), not both")
        if problems:
            raise ProfileError(f"workload: {problems[0]}")

    @property
    def calls_per_run(self) -> int:
        """pipe() calls in one run."""
        return len(self.seeds) * (1 if self.class_labels else max(1, len(self.prompts)))

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-safe data (lists for tuples)."""
        return {k: list(v) if isinstance(v, tuple) else v for k, v in dataclasses.asdict(self).items()}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Workload:
        """Inverse of :meth:`to_dict`.

        Raises:
            ProfileError: unknown keys or invalid values.
        """
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ProfileError(f"workload: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(known))}")
        try:
            return cls(**data)
        except TypeError as e:
            raise ProfileError(f"workload: {e}") from None

    @classmethod
    def for_pipeline(cls, pipe: Any, **overrides: Any) -> Workload:
        """The default workload of a pipeline's family: four fixed prompts (text pipelines) or four
        ImageNet classes (DiT), seed 0, generation settings from the pipeline (None).

        Args:
            pipe: the pipeline.
            **overrides: any :class:`Workload` field.

        Raises:
            ProfileError: an unknown field or invalid value.
        """
        if "class_labels" in call_parameters(pipe):
            base = cls(class_labels=DEFAULT_CLASS_LABELS)
        else:
            base = cls(prompts=DEFAULT_PROMPTS)
        known = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(overrides) - known)
        if unknown:
            raise ProfileError(f"workload: unknown key {unknown[0]!r}; allowed: {', '.join(sorted(known))}")
        if "prompts" in overrides and "class_labels" not in overrides:
            overrides["class_labels"] = ()
        if "class_labels" in overrides and "prompts" not in overrides and overrides["class_labels"]:
            overrides["prompts"] = ()
        return dataclasses.replace(base, **overrides)

    def calls(self, pipe: Any) -> list[tuple[int, dict[str, Any]]]:
        """The (seed, kwargs) of every call of one run, in order (generator and output_type not included).

        Raises:
            FluxtuneError: the workload sets something this pipeline's call does not take.
        """
        params = call_parameters(pipe)
        wanted = {
            "num_inference_steps": self.steps, "guidance_scale": self.guidance, "height": self.height,
            "width": self.width, "max_sequence_length": self.max_sequence_length,
        }
        common: dict[str, Any] = {}
        for kwarg, value in wanted.items():
            if value is None:
                continue
            if kwarg not in params:
                raise FluxtuneError(
                    f"workload sets {kwarg}={value} but {_class_name(pipe)}.__call__ has no {kwarg}; leave it unset"
                )
            common[kwarg] = value
        if "class_labels" in params:
            if not self.class_labels:
                raise FluxtuneError(f"workload has no class_labels, which {_class_name(pipe)} needs; "
                                    f"e.g. class_labels={list(DEFAULT_CLASS_LABELS)}")
            labels = [label for label in self.class_labels for _ in range(self.images_per_prompt or 1)]
            return [(seed, {**common, "class_labels": labels}) for seed in self.seeds]
        if "prompt" not in params:
            raise FluxtuneError(f"{_class_name(pipe)}.__call__ takes neither prompt nor class_labels")
        if not self.prompts:
            raise FluxtuneError(f"workload has no prompts, which {_class_name(pipe)} needs")
        if self.images_per_prompt is not None:
            common["num_images_per_prompt"] = self.images_per_prompt
        return [(seed, {**common, "prompt": p}) for p in self.prompts for seed in self.seeds]


def _class_name(pipe: Any) -> str:
    return base_class(pipe).__name__


def call_parameters(pipe: Any) -> set[str]:
    # The pipeline's own __call__, under fluxtune's default-filling wrapper if apply() installed one.
    cls = base_class(pipe)
    try:
        return set(inspect.signature(cls.__call__).parameters)
    except (TypeError, ValueError):
        return set()
