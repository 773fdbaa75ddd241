"""What ``apply`` did to each component, in order, and why anything was skipped."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Literal


@dataclass(frozen=True)
class Action:
    """One step of ``apply``: a knob on a component, applied or skipped, with the reason."""

    knob: str
    component: str
    status: Literal["applied", "skipped"]
    detail: str
    seconds: float = 0.0


@dataclass
class ApplyReport:
    """The ordered list of actions plus the time spent in the expensive ones."""

    profile: str
    device: str
    actions: list[Action] = field(default_factory=list)
    warnings: list[str] = field(default_factory=list)
    """What the user should know (e.g. the profile was measured on another model or GPU)."""

    def add(self, knob: str, component: str, detail: str, *, skipped: bool = False, seconds: float = 0.0) -> None:
        self.actions.append(Action(knob, component, "skipped" if skipped else "applied", detail, seconds))

    @property
    def applied(self) -> list[Action]:
        return [a for a in self.actions if a.status == "applied"]

    @property
    def skipped(self) -> list[Action]:
        return [a for a in self.actions if a.status == "skipped"]

    def seconds(self, knob: str | None = None) -> float:
        """Seconds spent, in total or for one knob (quantize, compile, placement ...)."""
        return sum(a.seconds for a in self.actions if knob is None or a.knob == knob)

    def to_dict(self) -> dict[str, Any]:
        return {"profile": self.profile, "device": self.device, "actions": [asdict(a) for a in self.actions],
                "warnings": list(self.warnings)}

    def __str__(self) -> str:
        lines = [f"applied profile {self.profile!r} on {self.device}:"]
        for a in self.actions:
            mark = "+" if a.status == "applied" else "-"
            t = f" ({a.seconds:.2f}s)" if a.seconds >= 0.01 else ""
            lines.append(f"  {mark} {a.knob:<12} {a.component:<15} {a.detail}{t}")
        return "\n".join(lines)  # warnings go through the warnings module (the CLI prints each once)
