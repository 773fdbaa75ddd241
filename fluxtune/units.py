"""Human sizes ("12GB", "11.5GiB", 1_000_000) and image sizes ("1024x768"). No torch here."""

from __future__ import annotations

import math
import re

from fluxtune.errors import ProfileError

_UNITS = {
    "": 1, "B": 1,
    "KB": 10**3, "MB": 10**6, "GB": 10**9, "TB": 10**12,
    "KIB": 2**10, "MIB": 2**20, "GIB": 2**30, "TIB": 2**40,
    "K": 2**10, "M": 2**20, "G": 2**30, "T": 2**40,
}
MAX_BYTES = 2**50
"""1 PiB: far above any GPU or host; larger sizes are typos (1e30) and overflow the allocator's fraction."""
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*$")


def parse_bytes(value: str | int | float, *, field: str = "size") -> int:
    """Parse a memory size into bytes.

    Args:
        value: an int/float number of bytes, or a string such as ``"12GB"``, ``"11.5GiB"``, ``"800MB"``.
        field: the name used in the error message.

    Raises:
        ValueError: with the field, the value and the accepted forms.
    """
    hint = "use a positive size such as 12GB, 11.5GiB, 800MB or a number of bytes"
    # Inside a pydantic model the field name is already in the location: say only the value then.
    field = "" if field == "size" else f"{field}="
    if isinstance(value, bool):
        raise ValueError(f"{field}{value!r} is not a size; {hint}")
    if isinstance(value, int | float):
        if isinstance(value, float) and not math.isfinite(value):
            raise ValueError(f"{field}{value!r} is not a finite size; {hint}")
        if value <= 0:
            raise ValueError(f"{field}{value!r} must be positive; {hint}")
        if value > MAX_BYTES:
            raise ValueError(f"{field}{value!r} is more memory than any machine has (at most 1PiB); {hint}")
        return int(value)
    if not isinstance(value, str):
        raise ValueError(f"{field}{value!r} is not a size; {hint}")
    m = _SIZE_RE.match(value)
    if not m or m.group(2).upper() not in _UNITS:
        raise ValueError(f"{field}{value!r} is not a size; {hint}")
    n = float(m.group(1)) * _UNITS[m.group(2).upper()]
    if n <= 0:
        raise ValueError(f"{field}{value!r} must be positive; {hint}")
    if n > MAX_BYTES:
        raise ValueError(f"{field}{value!r} is more memory than any machine has (at most 1PiB); {hint}")
    return int(n)


def format_bytes(n: int | float) -> str:
    """Format bytes in decimal units, as GPU vendors and the budget flag do (12GB = 12e9)."""
    n = float(n)
    for unit, div in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("KB", 1e3)):
        if abs(n) >= div:
            return f"{n / div:.3g}{unit}" if n / div < 100 else f"{n / div:.0f}{unit}"
    return f"{int(n)}B"


def format_seconds(s: float) -> str:
    """A duration for a line of text, without its unit: three significant digits, whole seconds from 100 s."""
    return f"{s:.0f}" if s >= 100 else f"{s:.3g}"


def parse_image_size(value: str, *, field: str = "size") -> tuple[int, int]:
    """Parse ``"1024x768"`` (width x height) into ``(height, width)``."""
    m = re.match(r"^\s*(\d+)\s*[xX]\s*(\d+)\s*$", str(value))
    if not m:
        raise ValueError(f"{field}={value!r} is not an image size; use WIDTHxHEIGHT such as 1024x1024")
    width, height = int(m.group(1)), int(m.group(2))
    for name, v in (("width", width), ("height", height)):
        if v < 16 or v > 16384 or v % 16:
            raise ValueError(f"{field}={value!r}: {name} {v} must be a multiple of 16 between 16 and 16384, "
                             "e.g. 1024x1024")
    return height, width


def parse_duration(text: str, *, field: str = "--timeout") -> float:
    """'30m' -> 1800.0; '90s', '1.5h', '1h30m', '7m40s', or plain seconds.

    Raises:
        ProfileError: with the field, the value and the accepted forms.
    """
    unit = {"": 1, "s": 1, "m": 60, "h": 3600}
    plain = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([smh]?)\s*", text or "")
    if plain:
        return float(plain.group(1)) * unit[plain.group(2)]
    # Compound, largest unit first, each at most once: 1h30m, 7m40s, 1h5m30s.
    parts = re.fullmatch(r"\s*(?:([0-9]*\.?[0-9]+)h)?\s*(?:([0-9]*\.?[0-9]+)m)?\s*(?:([0-9]*\.?[0-9]+)s)?\s*",
                         text or "")
    if not parts or not any(parts.groups()):
        raise ProfileError(f"{field} {text!r} is not a duration; use e.g. 30m, 1h, 90s, 7m30s")
    return sum(float(v) * f for v, f in zip(parts.groups(), (3600, 60, 1), strict=True) if v)
