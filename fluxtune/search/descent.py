"""Structure before sampling: one knob at a time from the incumbent (coordinate descent).

After the warm start (the plain recipes and the presets), the search proposes the incumbent's
neighbours, configurations that differ from the best trial so far in one categorical knob, cheapest
knobs first, before the model-based sampler gets a say. An expert tunes this way, and it finds plain
winners that a sampler spread over 20 dimensions can miss in a dozen trials. Descent restarts around
every new incumbent. When no untried neighbour is left, the incumbent is a local optimum over single
moves, and TPE takes over.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from fluxtune.search.results import best_trial, feasible_trials, objective_of, spread
from fluxtune.search.space import SearchSpace

ORDER = ("attention", "transformer.quantize", "transformer.granularity", "transformer.fp16_accumulation", "compile",
         "batch", "transformer.offload", "transformer.group_level", "transformer.use_stream", "text_encoder_2.quantize", "text_encoders.offload",
         "transformer.layerwise_fp8", "cache", "vae.tiling", "tiling", "tiling.tile", "tiling.overlap", "size",
         "compile.fuse_qkv", "compile.fullgraph", "compile.inductor_flags", "transformer.keep_sensitive")
"""Knobs in the order their moves are tried: the ones that decide speed most on a GPU first (attention
backend, quantization, compilation, batch, placement), then the encoders, the lossy and the fine-grained
ones. With 12-15 trials, a cycle through every knob's first move must reach compilation early."""

_FIRST = {
    "attention": ("_native_cudnn", "flash", "_native_flash", "sage"),
    "transformer.quantize": ("fp8_dynamic", "int8_weight", "int8_dynamic", "fp8_weight", "int4_weight"),
    "compile": ("regional", "full"),
    "transformer.offload": ("partial", "group", "model", "sequential"),
    "text_encoders.offload": ("partial", "group", "model"),
    "text_encoder_2.quantize": ("int8_weight",),
    "cache": ("first_block", "taylorseer", "magcache"),
}
"""The value a knob's first move tries (an expert's first guess); the others follow once every knob has
had its first move."""

_MEMORY = ("transformer.offload", "transformer.group_level", "transformer.use_stream", "text_encoders.offload",
           "transformer.layerwise_fp8", "vae.tiling")
"""Knobs that trade speed for memory: the plain start already placed the model as the memory model allows
(and a quantize move refills the residency), so their moves wait until every speed knob had its first."""

_COMPILED = {"transformer.quantize": ("fp8_dynamic", "int8_dynamic")}
"""Moves that are only fast compiled: torchao's dynamic activation quantization runs as separate eager
kernels per linear (measured on the H200: fp8 dynamic eager projected 16-18 s per FLUX call against
10.5 s for the streamed bf16 model, and 2.9x slower than bf16 for DiT), so from an uncompiled incumbent
such a move comes with regional compile, as an expert would make it; otherwise the eager trial is
pruned and the compiled combination, two moves away, is never reached."""

_PLAIN = ("none", False, "off", "native", "default")
"""Lossless, hook-free values, in the order a categorical dimension is searched for one."""
def _plain(choices: Sequence[Any]) -> list[Any]:
    """The lossless, hook-free values among a dimension's choices, in :data:`_PLAIN`'s order (0 for a count,
    such as how many sensitive layer groups stay unquantized); compared by type too, since False == 0."""
    return [v for v in (*_PLAIN, 0) if any(c == v and type(c) is type(v) for c in choices)]


_RESIDENT_SHARES = (0.95, 0.85, 0.75, 0.65, 0.55, 0.45, 0.35, 0.25, 0.15, 0.05)


def _shares(space: SearchSpace) -> list[float]:
    """The resident shares to try, largest first, within the range the user left the dimension (a pin such
    as ``transformer.resident_fraction=0.5`` is that one value)."""
    dim = next((d for d in space.dims if d.name == "transformer.resident_fraction"), None)
    if dim is None or dim.low is None or dim.high is None:
        return list(_RESIDENT_SHARES)
    low, high = float(dim.low), float(dim.high)
    return sorted({min(max(s, low), high) for s in _RESIDENT_SHARES}, reverse=True)


def _active(space: SearchSpace, params: dict[str, Any]) -> dict[str, Any]:
    """``params`` restricted to the dimensions active under them (in the space's order)."""
    out: dict[str, Any] = {}
    for dim in space.dims:
        if dim.when(out) and dim.name in params:
            out[dim.name] = params[dim.name]
    return out


def _first(dim: Any, current: Any) -> Any:
    """A knob's first move from ``current``: the expert's first guess, or for an ordered numeric knob
    (batch) the nearest value, else the first other choice."""
    others = [v for v in dim.choices if v != current]
    for value in _FIRST.get(dim.name, ()):
        if value in others:
            return value
    if others and all(isinstance(v, int | float) and not isinstance(v, bool) for v in [current, *others]):
        return min(others, key=lambda v: (abs(v - current), -v))
    return others[0] if others else None


def neighbours(space: SearchSpace, params: dict[str, Any], after: str | None = None) -> list[tuple[str, dict[str, Any]]]:
    """(label, params) of every configuration one categorical move away from ``params``: first one move per
    speed knob (its first guess, :data:`ORDER`), then one per memory knob (:data:`_MEMORY`), then the knobs'
    other values in the same order. With ``after``
    (the knob moved last) the cycle continues from the knob after it, as coordinate descent does, instead
    of starting over at every new incumbent.

    A move that switches on new categorical dimensions sets them to their plain value (compile=regional
    comes without flux-fast's inductor flags, whose autotuning made a DiT compile 100 s longer), so a move
    changes one knob; numeric ones are left to the sampler. The one exception is :data:`_COMPILED`: a
    dynamic-quantization move from an uncompiled incumbent also compiles.
    """
    base = _active(space, params)
    rank = {name: i for i, name in enumerate(ORDER)}
    dims = sorted((d for d in space.dims if d.categorical and d.name in base and len(d.choices) > 1),
                  key=lambda d: rank.get(d.name, len(ORDER)))
    if after is not None and after in rank:
        cut = next((i for i, d in enumerate(dims) if rank.get(d.name, len(ORDER)) > rank[after]), len(dims))
        dims = dims[cut:] + dims[:cut]
    firsts = [(d, _first(d, base[d.name])) for d in dims]
    moves = [(d, v) for d, v in firsts if v is not None and d.name not in _MEMORY]
    moves += [(d, v) for d, v in firsts if v is not None and d.name in _MEMORY]
    moves += [(d, v) for d in dims for v in d.choices if v != base[d.name] and (d, v) not in moves]
    out = []
    compile_dim = next((d for d in space.dims if d.name == "compile"), None)
    for dim, value in moves:
        moved = _active(space, {**base, dim.name: value})
        moved[dim.name] = value
        label = f"{dim.name}={value}"
        if (value in _COMPILED.get(dim.name, ()) and compile_dim is not None and "regional" in compile_dim.choices
                and moved.get("compile") == "off"):
            moved["compile"] = "regional"
            label += " with compile=regional"
        for new in space.dims:
            plain = _plain(new.choices)
            if plain and new.name not in moved and new.name not in base and new.when(moved):
                moved[new.name] = plain[0]
        out.append((label, moved))
    return out


def next_move(space: SearchSpace, incumbent: Any, tried: list[dict[str, Any]],
              fits: Callable[[dict[str, Any]], bool] | None = None,
              after: str | None = None) -> tuple[str, dict[str, Any]] | None:
    """The first neighbour of ``incumbent`` (a finished trial) that no trial in ``tried`` (their params) has
    covered, continuing the cycle after knob ``after``; None when descent around it is done.

    With ``fits`` (the memory model under the budget), a streamed neighbour keeps the largest resident
    share that fits: quantizing a streamed transformer halves its blocks, so twice as many can stay."""
    for label, params in neighbours(space, dict(incumbent.params), after):
        if fits is not None and params.get("transformer.offload") == "partial":
            params, label = _fill_residency(params, label, fits, _shares(space))
        if not any(all(t.get(k) == v for k, v in params.items()) for t in tried):
            return f"descent from trial {incumbent.number + 1}: {label}", params
    return None


def incumbent(study: Any) -> Any | None:
    """The trial descent moves from: the best one, unless a trial of better quality is within the runs'
    noise of it (then that one, the lossless one first). A lossy knob that gains less than the noise is no
    gain, and following it by chance narrows the search: on a busy 2-core machine int8 weights came out 3 %
    ahead of bf16, descent moved from them, and the cache that wins beyond noise was never tried."""
    best = best_trial(study)
    objective = objective_of(study)
    if best is None or objective not in ("latency", "throughput"):
        return best

    def cost(t: Any) -> float | None:  # seconds per call (latency) or per image (throughput)
        a = t.user_attrs
        if objective == "throughput":
            return 1.0 / a["throughput"] if a.get("throughput") else None
        return a.get("latency_s")

    def noise(t: Any) -> float:  # the runs' spread, relative to the call's latency
        m = t.user_attrs.get("measurement") or {}
        s, lat = spread(m.get("latency_runs")), m.get("latency_s") or t.user_attrs.get("latency_s")
        return s / lat if s and lat else 0.0

    def psnr(t: Any) -> float:
        return min(float((t.user_attrs.get("quality") or {}).get("psnr") or 0.0), 100.0)

    top = cost(best)
    if not top:
        return best
    near = [t for t in feasible_trials(study)
            if (c := cost(t)) is not None and (c - top) / top <= max(noise(t), noise(best))]
    return max(near, key=lambda t: (psnr(t), -(cost(t) or 0.0)), default=best)


def last_moved(sources: Sequence[str]) -> str | None:
    """The knob of the latest descent move among trial sources ("descent from trial N: KNOB=VALUE ...")."""
    for source in reversed(sources):
        if source.startswith("descent from trial") and ": " in source:
            return source.split(": ", 1)[1].split("=", 1)[0]
    return None


def _fill_residency(params: dict[str, Any], label: str, fits: Callable[[dict[str, Any]], bool],
                    shares: list[float]) -> tuple[dict[str, Any], str]:
    current = params.get("transformer.resident_fraction")
    for share in sorted({*shares, *([current] if current is not None else [])}, reverse=True):
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
            plain = _plain(dim.choices)
            # Full steps are the lossless ones; other numeric choices start at their first.
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
                       for share in _shares(space)]
    for size in sorted(sizes, key=_size_px, reverse=True):
        for batch in sorted(batches, reverse=True):
            for place in placements:
                candidate = _active(space, {**params, "size": size, "batch": batch, **place})
                if fits(candidate):
                    where = "resident" if not place else f"streamed, {place['transformer.resident_fraction']:.0%} resident"
                    return f"plain start: lossless, batch {batch}, {where}", candidate
    return None
