"""Structure before sampling: one knob at a time from the incumbent (coordinate descent).

After the warm start (the plain recipes and the presets), the search proposes the incumbent's
neighbours, configurations that differ from the best trial so far in one categorical knob, cheapest
knobs first, before the model-based sampler gets a say. An expert tunes this way, and it finds plain
winners that a sampler spread over 20 dimensions can miss in a dozen trials. Descent restarts around
every new incumbent. When no untried neighbour is left, the incumbent is a local optimum over single
moves, and TPE takes over.
"""

from __future__ import annotations

from typing import Any

from fluxtune.search.space import SearchSpace

ORDER = ("attention", "vae.tiling", "cache", "text_encoder_2.quantize", "text_encoders.offload",
         "transformer.quantize", "transformer.granularity", "transformer.layerwise_fp8", "transformer.offload",
         "transformer.group_level", "transformer.use_stream", "batch", "size", "compile", "compile.fuse_qkv",
         "compile.fullgraph", "compile.inductor_flags", "transformer.keep_sensitive")
"""Knobs in the order their moves are tried: cheap to apply and judge first (attention, VAE, caches),
then precision and placement, then compilation (each compiled trial pays its compile)."""


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


def next_move(space: SearchSpace, incumbent: Any, tried: list[dict[str, Any]]) -> tuple[str, dict[str, Any]] | None:
    """The first neighbour of ``incumbent`` (a finished trial) that no trial in ``tried`` (their params) has
    covered, or None when descent around it is done."""
    for label, params in neighbours(space, dict(incumbent.params)):
        if not any(all(t.get(k) == v for k, v in params.items()) for t in tried):
            return f"descent from trial {incumbent.number + 1}: {label}", params
    return None
