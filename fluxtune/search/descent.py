"""Structure before sampling: one knob at a time from the incumbent (coordinate descent).

After the warm start (the plain recipes and the presets), the search proposes the incumbent's
neighbours, configurations that differ from the best trial so far in one categorical knob, cheapest
knobs first, before the model-based sampler gets a say. An expert tunes this way, and it finds plain
winners that a sampler spread over 20 dimensions can miss in a dozen trials. Descent restarts around
every new incumbent. When no untried neighbour is left, the incumbent is a local optimum over single
moves, and TPE takes over.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from fluxtune.search.space import SearchSpace

ORDER = ("attention", "vae.tiling", "cache", "tiling", "tiling.tile", "tiling.overlap", "text_encoder_2.quantize",
         "text_encoders.offload",
         "transformer.quantize", "transformer.granularity", "transformer.layerwise_fp8", "transformer.offload",
         "transformer.group_level", "transformer.use_stream", "batch", "size", "compile", "compile.fuse_qkv",
         "compile.fullgraph", "compile.inductor_flags", "transformer.keep_sensitive")
"""Knobs in the order their moves are tried: cheap to apply and judge first (attention, VAE, caches),
then precision and placement, then compilation (each compiled trial pays its compile)."""

_PLAIN = ("none", False, "off", "native", "default")
"""Lossless, hook-free values, in the order a categorical dimension is searched for one."""
_RESIDENT_SHARES = (0.95, 0.85, 0.75, 0.65, 0.55, 0.45, 0.35, 0.25, 0.15, 0.05)


def _active(space: SearchSpace, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` restricted to the dimensions active under them (in the space's order)."""
    out: dict[str, Any] = {}
    for dim in space.dims:
        if dim.when(out) and dim.name in params:
            out[dim.name] = params[dim.name]
    return out


def neighbours(space: SearchSpace, params: dict[str, Any]) -> list[tuple[str, dict[str, Any]]]:
    """(label, params) of every configuration one categorical move away from ``params``, cheapest first.

    A move that switches on new dimensions leaves them out: the sampler fills them in when the trial asks.
    """
    base = _active(space, params)
    rank = {name: i for i, name in enumerate(ORDER)}
    dims = sorted((d for d in space.dims if d.categorical and d.name in base and len(d.choices) > 1),
                  key=lambda d: rank.get(d.name, len(ORDER)))
    out = []
    for dim in dims:
        for value in dim.choices:
            if value == base[dim.name]:
                continue
            moved = _active(space, {**base, dim.name: value})
            moved[dim.name] = value
            out.append((f"{dim.name}={value}", moved))
    return out


def next_move(space: SearchSpace, incumbent: Any, tried: list[dict[str, Any]],
              fits: Callable[[dict[str, Any]], bool] | None = None) -> tuple[str, dict[str, Any]] | None:
    """The first neighbour of ``incumbent`` (a finished trial) that no trial in ``tried`` (their params) has
    covered, or None when descent around it is done.

    With ``fits`` (the memory model under the budget), a streamed neighbour keeps the largest resident
    share that fits: quantizing a streamed transformer halves its blocks, so twice as many can stay."""
    for label, params in neighbours(space, dict(incumbent.params)):
        if fits is not None and params.get("transformer.offload") == "partial":
            params, label = _fill_residency(params, label, fits)
        if not any(all(t.get(k) == v for k, v in params.items()) for t in tried):
            return f"descent from trial {incumbent.number + 1}: {label}", params
    return None


def _fill_residency(params: dict[str, Any], label: str,
                    fits: Callable[[dict[str, Any]], bool]) -> tuple[dict[str, Any], str]:
    current = params.get("transformer.resident_fraction")
    for share in sorted({*_RESIDENT_SHARES, *([current] if current is not None else [])}, reverse=True):
        candidate = {**params, "transformer.resident_fraction": share}
        if fits(candidate):
            if share != params.get("transformer.resident_fraction"):
                label += f" ({share:.0%} resident: the most that fits)"
            return candidate, label
    return params, label


def _size_px(value: Any) -> int:
    w, _, h = str(value).partition("x")
    return int(w) * int(h) if w.isdigit() and h.isdigit() else 0


def plain_start(space: SearchSpace, fits: Callable[[dict[str, Any]], bool]) -> tuple[str, dict[str, Any]] | None:
    """The search's first configuration: lossless and hook-free (no quantization, cache, compile or
    offload, full steps), at the largest batch and size that ``fits`` (the memory model under the
    budget) admits; when the model does not fit whole, its transformer streams with the largest
    resident share that fits and its text encoders stream. None when nothing plain fits.

    The range of the two dimensions that most decide speed comes from the memory model, not the sampler:
    the largest batch that fits is where throughput peaks, the largest resident share where streamed
    latency is lowest.
    """
    params: dict[str, Any] = {}
    for dim in space.dims:
        if not dim.when(params):
            continue
        if dim.categorical:
            plain = [v for v in _PLAIN if v in dim.choices]
            # Full steps are the lossless ones; other numeric choices (keep_sensitive) start at their first.
            params[dim.name] = plain[0] if plain else max(dim.choices) if dim.name == "steps" else dim.choices[0]
        else:
            assert dim.low is not None and dim.high is not None
            # Only full steps and numeric knobs of active offloads remain here; the largest is the lossless/fullest.
            params[dim.name] = int(dim.high) if dim.integer else float(dim.high)
    sizes = next((d.choices for d in space.dims if d.name == "size"), ("default",))
    batches = next((d.choices for d in space.dims if d.name == "batch"), (1,))
    placements: list[dict[str, Any]] = [{}]
    offload_dim = next((d for d in space.dims if d.name == "transformer.offload"), None)
    if offload_dim is not None and "partial" in offload_dim.choices:
        enc = next((d for d in space.dims if d.name == "text_encoders.offload"), None)
        stream_enc = {"text_encoders.offload": "partial"} if enc is not None and "partial" in enc.choices else {}
        placements += [{"transformer.offload": "partial", "transformer.resident_fraction": share, **stream_enc}
                       for share in _RESIDENT_SHARES]
    for size in sorted(sizes, key=_size_px, reverse=True):
        for batch in sorted(batches, reverse=True):
            for place in placements:
                candidate = _active(space, {**params, "size": size, "batch": batch, **place})
                if fits(candidate):
                    where = "resident" if not place else f"streamed, {place['transformer.resident_fraction']:.0%} resident"
                    return f"plain start: lossless, batch {batch}, {where}", candidate
    return None
