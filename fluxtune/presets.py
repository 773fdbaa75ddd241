"""Profiles as YAML files: load, save, dotted overrides, and the shipped presets. No torch here.

Loading never executes anything from the file: YAML is parsed by OmegaConf's safe loader, and
interpolations (``${...}``), which could read the environment or call resolvers, are refused.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf
from omegaconf.errors import OmegaConfBaseException

from fluxtune.errors import ProfileError
from fluxtune.profile import Profile, validate_profile

PRESET_DIR_ENV = "FLUXTUNE_PROFILES"


def preset_dir() -> Path:
    """Where the shipped presets live: ``$FLUXTUNE_PROFILES`` or the repository's ``profiles/``."""
    env = os.environ.get(PRESET_DIR_ENV)
    return Path(env) if env else Path(__file__).resolve().parent.parent / "profiles"


def list_presets() -> dict[str, Path]:
    """Shipped presets by name (file stem), sorted."""
    folder = preset_dir()
    if not folder.is_dir():
        return {}
    return {p.stem: p for p in sorted(folder.glob("*.yaml"))}


def _reject_interpolation(node: Any, where: str) -> None:
    if isinstance(node, dict):
        for k, v in node.items():
            _reject_interpolation(v, f"{where}.{k}" if where else str(k))
    elif isinstance(node, list):
        for i, v in enumerate(node):
            _reject_interpolation(v, f"{where}[{i}]")
    elif isinstance(node, str) and "${" in node:
        raise ProfileError(f"{where}={node!r}: interpolations are not allowed in profiles (they could read the environment)")


def _parse_value(text: str) -> Any:
    # OmegaConf's dotlist parser types values the YAML way ("28" -> 28, "true" -> True, "[a,b]" -> list).
    try:
        container = OmegaConf.to_container(OmegaConf.from_dotlist([f"v={text}"]), resolve=False)
    except OmegaConfBaseException as e:
        raise ProfileError(f"override value {text!r} cannot be parsed: {e}") from None
    assert isinstance(container, dict)
    return container["v"]


def apply_overrides(data: dict[str, Any], overrides: Sequence[str]) -> dict[str, Any]:
    """Apply ``section.key=value`` overrides to plain profile data (a new dict is returned).

    A scalar may replace a whole section (``transformer.quantize=int8_weight``, ``cache=first_block``):
    the profile's shorthand rules turn it back into a section on validation.
    """
    out: dict[str, Any] = OmegaConf.to_container(OmegaConf.create(data), resolve=False)  # type: ignore[assignment]
    for item in overrides:
        if "=" not in item:
            raise ProfileError(f"override {item!r} is not KEY=VALUE; example: transformer.quantize=int8_weight")
        key, _, raw = item.partition("=")
        parts = [p for p in key.strip().split(".") if p]
        if not parts:
            raise ProfileError(f"override {item!r} has an empty key; example: generation.steps=20")
        value = _parse_value(raw)
        _reject_interpolation(value, key)
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if isinstance(child, str):  # expand a shorthand so a sub-key can be set on it
                child = {"mode": child} if part == "offload" else {"kind": child} if part == "cache" else {"method": child}
            if not isinstance(child, dict):
                child = {}
            node[part] = child
            node = child
        node[parts[-1]] = value
    return out


def load_data(source: str | Path) -> dict[str, Any]:
    """Read profile data from a YAML file or a preset name, without validating it."""
    path = Path(source)
    if not path.exists():
        presets = list_presets()
        if str(source) in presets:
            path = presets[str(source)]
        else:
            names = ", ".join(presets) or "none shipped"
            raise ProfileError(f"profile {str(source)!r} is neither a file nor a preset; presets: {names}")
    try:
        cfg = OmegaConf.load(path)
    except (OmegaConfBaseException, OSError, ValueError, yaml.YAMLError) as e:
        # Only plain YAML is read: tags such as !!python/object are refused by the safe loader.
        raise ProfileError(f"{path}: not a plain YAML profile: {str(e).splitlines()[0]}") from None
    data = OmegaConf.to_container(cfg, resolve=False)
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: a profile is a mapping of sections, got a {type(data).__name__}")
    _reject_interpolation(data, "")
    return data  # type: ignore[return-value]


def load_profile(source: str | Path | Profile | dict[str, Any], overrides: Sequence[str] = ()) -> Profile:
    """Load and validate a profile from a YAML path, a preset name, a dict or a Profile.

    Args:
        source: where the profile comes from.
        overrides: dotted ``KEY=VALUE`` overrides applied before validation.

    Raises:
        ProfileError: one line naming the file/field, the value and what would work.
    """
    if isinstance(source, Profile):
        data, name = source.to_dict(), "profile"
    elif isinstance(source, dict):
        data, name = source, "profile"
    else:
        data, name = load_data(source), str(source)
    if overrides:
        data = apply_overrides(data, overrides)
    return validate_profile(data, source=name)


def to_yaml(profile: Profile, *, full: bool = False) -> str:
    """The profile as YAML text (only non-default fields unless ``full``)."""
    return OmegaConf.to_yaml(OmegaConf.create(profile.to_dict(exclude_defaults=not full)), sort_keys=False)


def save_profile(profile: Profile, path: str | Path, *, full: bool = False) -> Path:
    """Write the profile as YAML; returns the path written."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(to_yaml(profile, full=full))
    return out


def tier_presets(family: str = "flux") -> list[tuple[int, str]]:
    """The shipped presets of a family that carry a budget, as (budget bytes, name), smallest budget first."""
    out = []
    for name, path in list_presets().items():
        p = load_profile(path)
        if p.family == family and p.budget.vram is not None:
            out.append((p.budget.vram, name))
    return sorted(out)


def preset_for_card(memory_gib: float, family: str = "flux") -> str | None:
    """The preset of a card's tier: the one with the largest budget ``NGB`` the card holds (a card sold as
    N GB has N GiB and its owner passes NGB; see :class:`fluxtune.knobs.Budget`), None below the smallest."""
    fitting = [name for vram, name in tier_presets(family) if vram <= memory_gib * 1e9 + 1]
    return fitting[-1] if fitting else None
