"""Warm start: the plain diffusers recipes and the shipped presets, as search parameters."""

from __future__ import annotations

from typing import Any

from fluxtune.profile import Profile
from fluxtune.search.space import LLM_ENCODED, SearchSpace

_PLAIN = {
    "transformer.quantize": "none", "transformer.layerwise_fp8": False, "text_encoders.offload": "none",
    "text_encoder_2.quantize": "none", "vae.tiling": False, "cache": "none", "compile": "off", "attention": "native",
}

RECIPES: dict[str, dict[str, Any]] = {
    "bf16, no offload": {**_PLAIN, "transformer.offload": "none"},
    "enable_model_cpu_offload": {**_PLAIN, "transformer.offload": "model"},
    "group offload, leaf level, streams": {
        **_PLAIN, "transformer.offload": "group", "transformer.group_level": "leaf", "transformer.use_stream": True,
        "text_encoders.offload": "group"},
    "group offload, block level, streams": {
        **_PLAIN, "transformer.offload": "group", "transformer.group_level": "block",
        "transformer.blocks_per_group": 1, "transformer.use_stream": True, "text_encoders.offload": "group"},
    "flux-fast core (fp8 rowwise + regional compile)": {
        **_PLAIN, "transformer.offload": "none", "transformer.quantize": "fp8_dynamic",
        "transformer.granularity": "row", "compile": "regional", "compile.fullgraph": True, "compile.fuse_qkv": True,
        "compile.inductor_flags": True},
    "fluxtune partial residency, fp8": {
        **_PLAIN, "transformer.offload": "partial", "transformer.quantize": "fp8_dynamic",
        "transformer.granularity": "row", "transformer.resident_fraction": 0.7, "text_encoders.offload": "partial",
        "text_encoder_2.quantize": "int8_weight"},
    "int8 weight-only": {**_PLAIN, "transformer.offload": "none", "transformer.quantize": "int8_weight"},
}


def params_from_profile(profile: Profile, space: SearchSpace) -> dict[str, Any]:
    """Search parameters that reproduce a profile as closely as the space can."""
    t = profile.transformer
    p: dict[str, Any] = {"steps": profile.generation.steps}
    p["transformer.quantize"] = t.quantize.method if t.quantize else "none"
    if t.quantize and t.quantize.method == "fp8_dynamic":
        p["transformer.granularity"] = t.quantize.granularity
    if not t.quantize:
        p["transformer.layerwise_fp8"] = t.layerwise_casting is not None
    off = t.offload
    p["transformer.offload"] = off.mode
    if off.mode == "group":
        p["transformer.group_level"] = off.level  # type: ignore[union-attr]
        p["transformer.use_stream"] = off.use_stream  # type: ignore[union-attr]
        if off.level == "block":  # type: ignore[union-attr]
            p["transformer.blocks_per_group"] = off.blocks_per_group  # type: ignore[union-attr]
    if off.mode == "partial" and space.transformer_bytes and off.resident:  # type: ignore[union-attr]
        scale = 1.0 if not t.quantize else 0.5
        p["transformer.resident_fraction"] = min(0.98, max(0.05, off.resident / (space.transformer_bytes * scale)))  # type: ignore[union-attr]
    if space.family == "flux":
        p["text_encoders.offload"] = profile.text_encoder_2.offload.mode
        p["text_encoder_2.quantize"] = profile.text_encoder_2.quantize.method if profile.text_encoder_2.quantize else "none"
    elif space.family in LLM_ENCODED:
        p["text_encoders.offload"] = profile.text_encoder.offload.mode
        p["text_encoder.quantize"] = profile.text_encoder.quantize.method if profile.text_encoder.quantize else "none"
    p["vae.tiling"] = profile.vae.tiling
    c = profile.cache
    p["cache"] = c.kind
    if c.kind in ("first_block", "magcache"):
        p["cache.threshold"] = c.threshold  # type: ignore[union-attr]
    if c.kind == "taylorseer":
        p["cache.interval"] = c.cache_interval  # type: ignore[union-attr]
        p["cache.warmup"] = c.disable_cache_before_step  # type: ignore[union-attr]
    p["attention"] = profile.attention.backend
    p["compile"] = "regional" if profile.compile.enabled else "off"
    if profile.compile.enabled:
        p["compile.fullgraph"] = profile.compile.fullgraph
        p["compile.fuse_qkv"] = profile.compile.fuse_qkv
        p["compile.inductor_flags"] = profile.compile.inductor_flags
    return p


def fits_space(params: dict[str, Any], space: SearchSpace) -> bool:
    """Whether every parameter is allowed by the (possibly narrowed) space, and active in it."""
    dims = {d.name: d for d in space.dims}
    active: dict[str, Any] = {}
    for d in space.dims:
        if not d.when(active):
            continue
        if d.name not in params:
            continue
        v = params[d.name]
        if d.categorical and v not in d.choices:
            return False
        if not d.categorical and d.low is not None and d.high is not None and not (d.low <= v <= d.high):
            return False
        active[d.name] = v
    return all(k in dims for k in params)


def shipped_presets(family: str, capability: str | None) -> list[Profile]:
    """The shipped presets of a family (and the family-agnostic ones), each as the variant for this capability
    class: a GeForce Ada card's search starts from the tensor-wise fp8 variant, which its space allows,
    not the row-wise base, which it does not. Presets that fail to load are left out."""
    from fluxtune.presets import list_presets, load_profile

    out = []
    for path in list_presets().values():
        try:
            p = load_profile(path).for_class(capability)
        except Exception:
            continue
        if p.family in ("any", family):
            out.append(p)
    return out


def warm_start(space: SearchSpace, presets: list[Profile]) -> list[tuple[str, dict[str, Any]]]:
    """(label, params) of the presets, then the recipes, that fit this space."""
    out: list[tuple[str, dict[str, Any]]] = []
    for prof in presets:
        params = params_from_profile(prof, space)
        if fits_space(params, space):
            out.append((f"preset {prof.name}", params))
    for label, params in RECIPES.items():
        full = {"steps": space.base.generation.steps, **params}
        if fits_space(full, space):
            out.append((f"recipe {label}", full))
    return out
