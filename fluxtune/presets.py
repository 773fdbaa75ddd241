"""Profiles as YAML files: load, save, dotted overrides, and the shipped presets. No torch here.

Loading never executes anything from the file: YAML is parsed by a PyYAML safe loader (YAML 1.2 booleans,
duplicate keys refused with their line), and
interpolations (``${...}``), which could read the environment or call resolvers, are refused.
"""

from __future__ import annotations

import contextlib
import functools
import os
import re
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import yaml
from omegaconf import OmegaConf

from fluxtune.errors import ProfileError
from fluxtune.profile import Profile, validate_profile

PRESET_DIR_ENV = "FLUXTUNE_PROFILES"


MAX_FILE_BYTES = 1_000_000
"""A profile is a few KB; a larger file is refused before it is parsed."""
MAX_NODES = 100_000
"""Values a profile may hold once YAML aliases are expanded (a few hundred in practice)."""


def preset_dir() -> Path:
    """Where the shipped presets live: ``$FLUXTUNE_PROFILES``, the copy a wheel or ``pip install .`` ships
    in the package (``fluxtune/profiles``, made by setup.py at build time), or the repository's
    ``profiles/`` (their source, read in place by a checkout or an editable install)."""
    env = os.environ.get(PRESET_DIR_ENV)
    if env:
        return Path(env)
    here = Path(__file__).resolve().parent
    packaged = here / "profiles"
    return packaged if packaged.is_dir() else here.parent / "profiles"


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


class _Loader(yaml.SafeLoader):
    """PyYAML's safe loader with YAML 1.2 booleans (only true/false: ``off``/``on``/``yes``/``no`` are
    choice names here, e.g. ``compile: {mode: off}``) and duplicate keys refused with their line."""

    def construct_mapping(self, node: Any, deep: bool = False) -> Any:
        if isinstance(node, yaml.MappingNode):
            seen: dict[Any, Any] = {}
            for key_node, _ in node.value:
                key = self.construct_object(key_node, deep=deep)
                if isinstance(key, list | dict):
                    continue  # the base class reports unhashable keys
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        f"key {key!r} first set on line {seen[key].line + 1}", seen[key],
                        f"duplicate key {key!r}; keep one", key_node.start_mark)
                seen[key] = key_node.start_mark
        return super().construct_mapping(node, deep=deep)


_Loader.yaml_implicit_resolvers = {
    first: [(tag, rx) for tag, rx in resolvers if tag != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Loader.add_implicit_resolver("tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"),
                              list("tTfF"))


def _yaml_error(e: yaml.YAMLError) -> str:
    """A YAML error as one line that keeps its location (line, column) and the problem."""
    if isinstance(e, yaml.MarkedYAMLError) and e.problem_mark is not None:
        mark = e.problem_mark
        return f"line {mark.line + 1}, column {mark.column + 1}: {e.problem}" + (
            f" ({e.context})" if e.context and "duplicate" in str(e.problem) else "")
    return str(e).splitlines()[0] if str(e) else type(e).__name__


def _count_nodes(value: Any, limit: int) -> int:
    # Walks what aliases expand to, so a few lines of nested anchors cannot make validation explode.
    n, stack = 0, [value]
    while stack:
        v = stack.pop()
        n += 1
        if n > limit:
            raise ProfileError(f"expands to more than {limit} values through YAML anchors/aliases; "
                               "a profile holds a few hundred: write it out without nested aliases")
        if isinstance(v, dict):
            stack.extend(v.values())
        elif isinstance(v, list):
            stack.extend(v)
    return n


def parse_yaml(text: str, where: str) -> Any:
    """Parse YAML text (safe, YAML 1.2 booleans, no duplicate keys) into plain data.

    Raises:
        ProfileError: ``where: not plain YAML: line L, column C: problem``.
    """
    try:
        data = yaml.load(text, Loader=_Loader)  # noqa: S506 (a SafeLoader subclass)
    except yaml.YAMLError as e:
        # Only plain YAML is read: tags such as !!python/object are refused by the safe loader.
        raise ProfileError(f"{where}: not a plain YAML profile: {_yaml_error(e)}") from None
    except (ValueError, OverflowError, RecursionError) as e:
        raise ProfileError(f"{where}: not a plain YAML profile: {type(e).__name__}: {e}") from None
    try:
        _count_nodes(data, MAX_NODES)
    except ProfileError as e:
        raise ProfileError(f"{where}: {e}") from None
    return data


def _parse_value(text: str) -> Any:
    # Typed the YAML way ("28" -> 28, "true" -> True, "[a,b]" -> list, "off" stays a choice name).
    if not text.strip():
        return ""
    try:
        value = parse_yaml(text, "override")
    except ProfileError as e:
        problem = str(e).split(": not a plain YAML profile: ", 1)[-1]
        raise ProfileError(f"override value {text!r} cannot be parsed ({problem}); quote it or close its "
                           "brackets, e.g. generation.steps=20 or cache=[none,first_block]") from None
    return value


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
        _reject_interpolation(value, key.strip())
        node = out
        for part in parts[:-1]:
            child = node.get(part)
            if isinstance(child, str):  # expand a shorthand so a sub-key can be set on it
                child = ({"mode": child} if part in ("offload", "compile") else {"kind": child} if part == "cache"
                         else {"method": child})
            if not isinstance(child, dict):
                child = {}
            node[part] = child
            node = child
        node[parts[-1]] = value
        _yield_to_override(out, ".".join(parts))
    return out


def _yield_to_override(data: dict[str, Any], key: str) -> None:
    """Drop what the variants set at or under/over ``key``: the caller's override wins on every GPU class."""
    for variant in data.get("variants") or []:
        sets = variant.get("set") if isinstance(variant, dict) else None
        if isinstance(sets, dict):
            for k in [k for k in sets if k == key or k.startswith(key + ".") or key.startswith(k + ".")]:
                del sets[k]


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
        if path.is_dir():
            raise ProfileError(f"profile {str(source)!r} is a directory; pass a YAML file or a preset name")
        size = path.stat().st_size
        if size > MAX_FILE_BYTES:
            raise ProfileError(f"{path}: {size / 1e6:.1f} MB is too large for a profile (at most "
                               f"{MAX_FILE_BYTES // 1000} KB; a profile is a few KB of YAML); pass the right file")
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as e:
        raise ProfileError(f"{path}: cannot be read as a YAML profile: {type(e).__name__}: "
                           f"{getattr(e, 'strerror', None) or e}") from None
    data = parse_yaml(text, str(path))
    if data is None:
        raise ProfileError(f"{path}: the file is empty; a profile needs at least a name, e.g. "
                           "`fluxtune show flux-dev-12gb > my.yaml` and edit that")
    if not isinstance(data, dict):
        raise ProfileError(f"{path}: a profile is a mapping of sections, got a {type(data).__name__}")
    bad = [k for k in data if not isinstance(k, str)]
    if bad:
        raise ProfileError(f"{path}: key {bad[0]!r} is not a section name; section names are words such as "
                           "transformer or generation")
    _reject_interpolation(data, "")
    return data


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


def write_atomic(path: str | Path, data: str | bytes) -> Path:
    """Write a file whole or not at all: a temporary file in the same folder, then ``os.replace``, so a
    reader (or a second writer) never sees half a file."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".tmp", dir=out.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data.encode() if isinstance(data, str) else data)
            f.flush()
            os.fsync(f.fileno())
        if out.exists():
            os.chmod(tmp, out.stat().st_mode & 0o777)
        else:
            os.chmod(tmp, 0o666 & ~_umask())
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return out


def tier_presets(family: str = "flux") -> list[tuple[int, str]]:
    """The shipped presets of a family that carry a budget, as (budget bytes, name), smallest budget first."""
    files = tuple((name, str(path), Path(path).stat().st_mtime_ns) for name, path in list_presets().items())
    return list(_tiers(files, family))


@functools.lru_cache(maxsize=8)
def _tiers(files: tuple[tuple[str, str, int], ...], family: str) -> tuple[tuple[int, str], ...]:
    # Keyed on the files' modification times: `fluxtune presets` asks once per card, and a preset
    # rewritten by --write-measured is read again.
    out = []
    for name, path, _ in files:
        p = load_profile(path)
        if p.family == family and p.budget.vram is not None:
            out.append((p.budget.vram, name))
    return tuple(sorted(out))


def preset_for_card(memory_gib: float, family: str = "flux") -> str | None:
    """The preset of a card's tier: the one with the largest budget ``NGB`` the card holds (a card sold as
    N GB has N GiB and its owner passes NGB; see :class:`fluxtune.knobs.Budget`), None below the smallest."""
    fitting = [name for vram, name in tier_presets(family) if vram <= memory_gib * 1e9 + 1]
    return fitting[-1] if fitting else None


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def check_writable(path: str | Path, field: str) -> Path:
    """Check before any work that ``path`` can be written (its folder exists or can be made, it is not
    a folder); so a long run does not fail at its end.

    Raises:
        ProfileError: naming the field, the path and the fix.
    """
    out = Path(path)
    if out.is_dir() or str(path).endswith(("/", os.sep)):
        raise ProfileError(f"{field} {str(path)!r} is a folder; give a file name, e.g. {Path(path) / 'out'}")
    made: list[Path] = []
    try:
        missing = [p for p in [out.parent, *out.parent.parents] if not p.exists()]
        for folder in reversed(missing):  # made to test, removed again below
            folder.mkdir()
            made.append(folder)
        if out.exists():
            if not os.access(out, os.W_OK):
                raise PermissionError(f"{out} is read-only")
        else:
            fd, probe = tempfile.mkstemp(prefix=f".{out.name}.", suffix=".probe", dir=out.parent)
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        why = e.strerror or str(e)
        raise ProfileError(f"{field} {str(path)!r} cannot be written ({why}); choose a writable path") from None
    finally:
        for folder in reversed(made):
            with contextlib.suppress(OSError):
                folder.rmdir()
    return out


def save_profile(profile: Profile, path: str | Path, *, full: bool = False, header: str | None = None) -> Path:
    """Write the profile as YAML (atomically); returns the path written.

    Args:
        profile: what to write.
        path: the YAML file.
        full: write every field, defaults included.
        header: comment lines to put on top (``# `` is added to each line).
    """
    text = to_yaml(profile, full=full)
    if header:
        text = "".join(f"# {line}".rstrip() + "\n" for line in header.splitlines()) + text
    return write_atomic(path, text)


def update_measured(path: str | Path, profile: Profile) -> Path:
    """Replace the ``measured`` block of the YAML file ``path`` with ``profile.measured``, keeping the
    rest of the file as the user wrote it (comments, order, layout); atomically.

    The file is rewritten whole (comments on top kept) only when its ``measured`` block cannot be
    found as a top-level section.
    """
    out = Path(path)
    text = out.read_text(encoding="utf-8") if out.exists() else ""
    assert profile.measured is not None
    block = OmegaConf.to_yaml(OmegaConf.create({"measured": profile.measured.model_dump(mode="json",
                                                                                          exclude_defaults=True)}))
    lines = text.splitlines(keepends=True)
    start = next((i for i, line in enumerate(lines) if re.match(r"^measured\s*:", line)), None)
    if start is not None:
        end = next((j for j in range(start + 1, len(lines)) if re.match(r"^[^\s#]", lines[j])), len(lines))
        while end > start + 1 and lines[end - 1].lstrip().startswith("#"):
            end -= 1  # a comment just above the next section belongs to it
        new = "".join(lines[:start]) + block + "".join(lines[end:])
    else:
        new = text + ("" if not text or text.endswith("\n") else "\n") + block
    try:
        ok = validate_profile(parse_yaml(new, str(out)), source=str(out)) == profile
    except ProfileError:
        ok = False
    if not ok:  # a layout the text edit cannot handle: write the profile out, keeping the top comments
        head = "".join(line for line in lines[: next((i for i, x in enumerate(lines) if not x.startswith("#")),
                                                      len(lines))])
        new = head + to_yaml(profile)
    return write_atomic(out, new)
