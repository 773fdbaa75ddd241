"""The handler protocol and registry: one handler per knob, ordered by an explicit phase.

The order is data (``Handler.phase``), not import order. Every handler first *checks* the profile
against the pipeline and machine without touching anything; ``apply`` runs the handlers only when
no check found a problem, so nothing is half-applied by an invalid profile.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, ClassVar

from fluxtune.hardware import HardwareInfo
from fluxtune.profile import COMPONENTS, Profile
from fluxtune.tuning.report import ApplyReport

if TYPE_CHECKING:
    import torch

# Phases, in the order the constraints demand (diffusers-knobs.md §11):
ALLOCATOR = 5  # process-wide allocator settings, before any weight is cast, quantized or moved
PRECISION = 10  # cast before quantizing
FUSE = 20  # fuse QKV before quantizing (quantize_ then fuse raises)
MODULATION = 22  # modulation weights leave the transformer before LoRA, quantization and placement
LORA = 25  # load LoRAs; fused ones go into the base weights before quantization
QUANTIZE = 30
CASTING = 35  # layerwise fp8 storage (never together with quantize on one component)
ATTENTION = 40
VAE = 50
CACHE = 60  # hooks go on before compile
PLACEMENT = 70  # offload hooks / device moves, before compile
BUDGET = 75  # cap once weights are placed (a pipeline built on the GPU may hold more until offloaded)
COMPILE = 80  # last change to the modules
GENERATION = 90  # call defaults and guards

IRREVERSIBLE = ("precision", "fuse_qkv", "modulation", "quantize", "layerwise", "compile")
"""Knobs that change weights or traced code in place: a second profile must agree on them."""


@dataclass
class Context:
    """Everything a handler sees: the pipeline, the profile, the machine, and the report it writes."""

    pipe: Any
    profile: Profile
    hardware: HardwareInfo
    device: torch.device
    family: str
    report: ApplyReport
    strict: bool = False
    undo: list[tuple[str, Callable[[], None]]] = field(default_factory=list)
    """(knob, callback) pairs that revert reversible knobs, run in reverse on the next apply."""
    before_call: list[Callable[[], None]] = field(default_factory=list)
    """Run before every pipeline call (e.g. resetting cache state DiT does not reset itself)."""
    after_call: list[Callable[[], None]] = field(default_factory=list)
    """Run after every pipeline call, even a failed one (e.g. offloading the last model-offloaded component)."""
    call_defaults: dict[str, Any] = field(default_factory=dict)
    """Keyword arguments the wrapped ``__call__`` fills in when the caller leaves them out."""

    @property
    def on_gpu(self) -> bool:
        return self.device.type == "cuda"

    def components(self) -> dict[str, Any]:
        """The profile-addressable nn.Module components this pipeline has."""
        import torch

        out: dict[str, Any] = {}
        for name in COMPONENTS:
            module = getattr(self.pipe, name, None)
            if isinstance(module, torch.nn.Module):
                out[name] = module
        return out

    def skip(self, knob: str, component: str, reason: str) -> None:
        """Record a skip; with ``strict`` a skip is an error."""
        if self.strict:
            from fluxtune.errors import IncompatibleKnobsError

            raise IncompatibleKnobsError(f"{component}: {knob} skipped: {reason} (strict=True)")
        self.report.add(knob, component, reason, skipped=True)


class Handler(ABC):
    """One knob. Subclasses set ``name`` and ``phase`` and implement ``check`` and ``apply``."""

    name: ClassVar[str]
    phase: ClassVar[int]
    reversible: ClassVar[bool] = True

    def check(self, ctx: Context) -> list[str]:
        """Problems with the profile on this pipeline/machine; empty when fine. Must not mutate."""
        return []

    @abstractmethod
    def apply(self, ctx: Context) -> None:
        """Make the pipeline obey this knob; record actions in ``ctx.report``."""


HANDLERS: list[Handler] = []


def register(handler_cls: type[Handler]) -> type[Handler]:
    """Class decorator: add a handler to the registry, kept sorted by phase."""
    HANDLERS.append(handler_cls())
    HANDLERS.sort(key=lambda h: h.phase)
    return handler_cls


def torch_dtype(name: str) -> torch.dtype:
    import torch

    return {"bfloat16": torch.bfloat16, "float16": torch.float16, "float32": torch.float32}[name]
