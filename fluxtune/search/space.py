"""The search space: every profile knob as an Optuna dimension, conditional where it must be.

``suggest(trial)`` is define-by-run and builds a :class:`~fluxtune.profile.Profile`; replaying the
parameters of a finished trial through ``optuna.trial.FixedTrial`` gives the same profile back.
Users pin or narrow any dimension from a YAML space file or ``--pin KEY=VALUE``. No torch here.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

from fluxtune.errors import ProfileError
from fluxtune.hardware import HardwareInfo
from fluxtune.pipelines import TRUE_CFG_FAMILIES
from fluxtune.profile import Profile, validate_profile

Params = Mapping[str, Any]


@dataclass(frozen=True)
class Dim:
    """One dimension: categorical ``choices`` or a numeric range ``low``..``high``."""

    name: str
    choices: tuple[Any, ...] = ()
    low: float | None = None
    high: float | None = None
    log: bool = False
    integer: bool = False
    when: Callable[[Params], bool] = field(default=lambda p: True, compare=False, repr=False)
    help: str = ""

    @property
    def categorical(self) -> bool:
        return bool(self.choices)

    def suggest(self, trial: Any) -> Any:
        if self.categorical:
            return trial.suggest_categorical(self.name, list(self.choices))
        assert self.low is not None and self.high is not None
        if self.integer:
            return trial.suggest_int(self.name, int(self.low), int(self.high), log=self.log)
        return trial.suggest_float(self.name, float(self.low), float(self.high), log=self.log)

    def narrowed(self, spec: Any) -> Dim:
        """This dimension pinned to one value, restricted to a list, or to a ``{low, high}`` range."""
        if isinstance(spec, Mapping):
            unknown = set(spec) - {"low", "high", "log"}
            if unknown or self.categorical:
                raise ProfileError(f"space: {self.name}: a range {{low, high}} only fits numeric dimensions; "
                                   f"use one of {list(self.choices)} or a list of them")
            lo, hi = spec.get("low", self.low), spec.get("high", self.high)
            if lo is None or hi is None or lo > hi:
                raise ProfileError(f"space: {self.name}: low={lo} high={hi} is not a range")
            return replace(self, low=lo, high=hi, log=bool(spec.get("log", self.log)))
        values = list(spec) if isinstance(spec, list | tuple) else [spec]
        if not values:
            raise ProfileError(f"space: {self.name}: an empty list leaves nothing to try")
        if self.categorical:
            # A YAML space file reads `off` as false: map it back when "off" is this dimension's choice.
            values = ["off" if v is False and "off" in self.choices else v for v in values]
            bad = [v for v in values if v not in self.choices]
            if bad:
                raise ProfileError(f"space: {self.name}={bad[0]!r} is not a choice here; allowed: "
                                   f"{', '.join(map(str, self.choices))}")
            return replace(self, choices=tuple(values))
        for v in values:
            if not isinstance(v, int | float) or isinstance(v, bool):
                raise ProfileError(f"space: {self.name}={v!r} is not a number; use a number in "
                                   f"[{self.low}, {self.high}] or {{low, high}}")
        if len(values) == 1:
            return replace(self, low=values[0], high=values[0])
        return replace(self, choices=tuple(values), low=None, high=None)


TILING_FROM_PX = 1024
"""Regional denoising is searched only for images with a side above this (FLUX.1 draws 1024x1024 natively)."""

LLM_ENCODED = ("flux2", "qwenimage")
"""Families with one large LLM text encoder (Qwen3, Mistral-3, Qwen2.5-VL) as ``text_encoder``."""
PROMPTED = ("flux", *LLM_ENCODED)
"""Families drawn from a text prompt through text encoders (DiT draws class labels)."""


def _q(p: Params) -> str:
    return str(p.get("transformer.quantize", "none"))


def _off(p: Params) -> str:
    return str(p.get("transformer.offload", "none"))


def default_dims(hardware: HardwareInfo, family: str) -> list[Dim]:
    """All dimensions for this machine and pipeline family, before user narrowing."""
    gpu = hardware.has_cuda
    quant = ["none", "int8_weight", "int8_dynamic"]
    if gpu:
        quant += ["int4_weight"]
        if hardware.supports_fp8:
            quant += ["fp8_weight", "fp8_dynamic"]
    offloads = ["none", "model", "sequential", "group", "partial"] if gpu else ["none"]
    spec = hardware.spec()
    # float16 accumulate is searched where the GPU table says it doubles the GEMM rate (GeForce, A10G):
    # elsewhere it changes the numerics and nothing else.
    fp16acc = bool(spec and (spec.rate("fp16acc") or 0) > 1.05 * (spec.rate("bf16") or 0))
    from fluxtune.tuning.cache import family_problem

    caches = ["none", *(c for c in ("first_block", "taylorseer", "magcache") if family_problem(c, family) is None)]
    # Hooks fullgraph compile cannot trace: caches, streamed offloads and layerwise casting.
    hooks = lambda p: (p.get("cache", "none") != "none" or _off(p) in ("group", "partial", "sequential")  # noqa: E731
                       or bool(p.get("transformer.layerwise_fp8")))
    dims = [
        Dim("steps", low=28, high=28, integer=True, help="denoising steps (pin a range with --steps 20-50)"),
        Dim("size", ("default",), help="WIDTHxHEIGHT choices (--size 768x768,1024x1024)"),
        Dim("batch", (1,), help="images per call (DiT: class labels per call); searched by --objective throughput"),
        Dim("batch_cfg", (False, True), help="true CFG's two passes as one batch (searched when the base profile "
            "sets generation.negative_prompt)"),
        Dim("transformer.quantize", tuple(quant)),
        Dim("modulation.cache", (False, True), when=lambda p: family == "qwenimage",
            help="the blocks' modulation computed once per timestep, its weights off the GPU (Qwen-Image)"),
        Dim("transformer.granularity", ("row", "tensor") if hardware.supports_fp8_rowwise else ("tensor",),
            when=lambda p: _q(p) == "fp8_dynamic"),
        Dim("transformer.keep_sensitive", (0, 1, 2, 4, 8, 16, 32), help="how many of the most quantization-sensitive layer groups "
            "(from a sensitivity scan of that method) stay unquantized"),
        Dim("transformer.layerwise_fp8", (False, True), when=lambda p: _q(p) == "none"),
        Dim("transformer.fp16_accumulation", (False, True) if fp16acc else (False,),
            when=lambda p: fp16acc and _q(p) not in ("fp8_dynamic", "int8_dynamic", "int4_weight"),
            help="the transformer in float16 with float16 accumulate: twice the GEMM rate on GeForce cards "
            "(float16 overflows some models: the quality floor decides)"),
        Dim("transformer.offload", tuple(offloads)),
        Dim("transformer.group_level", ("leaf", "block"), when=lambda p: _off(p) == "group"),
        Dim("transformer.blocks_per_group", low=1, high=4, integer=True,
            when=lambda p: _off(p) == "group" and p.get("transformer.group_level") == "block"),
        Dim("transformer.use_stream", (True, False), when=lambda p: _off(p) == "group"),
        Dim("transformer.resident_fraction", low=0.05, high=0.98,
            when=lambda p: _off(p) == "partial", help="share of the transformer's blocks kept resident"),
        Dim("text_encoders.offload", ("none", "model", "group", "partial") if gpu else ("none",),
            when=lambda p: family in PROMPTED and _off(p) != "model",
            help="partial streams every encoder block from page-locked arenas (the fastest to apply)"),
        Dim("text_encoder_2.quantize", ("none", "int8_weight"), when=lambda p: family == "flux"),
        Dim("text_encoder.quantize", ("none", "int8_weight"), when=lambda p: family in LLM_ENCODED),
        Dim("vae.tiling", (False, True)),
        Dim("cache", tuple(caches)),
        Dim("cache.threshold", low=0.02, high=0.4, log=True,
            when=lambda p: p.get("cache") in ("first_block", "magcache")),
        Dim("cache.interval", low=2, high=8, integer=True, when=lambda p: p.get("cache") == "taylorseer"),
        Dim("cache.warmup", low=1, high=12, integer=True, when=lambda p: p.get("cache") == "taylorseer"),
        # Regional denoising: active only for sizes above TILING_FROM_PX (SearchSpace.create); a cache would
        # compare one tile's residual with another's.
        Dim("tiling", ("none", "regional"), when=lambda p: family == "flux" and p.get("cache", "none") == "none",
            help="regional denoising (tiles of the latent, blended) for large images"),
        Dim("tiling.tile", (512, 768, 1024), when=lambda p: p.get("tiling") == "regional", help="tile side, pixels"),
        Dim("tiling.overlap", (64, 128), when=lambda p: p.get("tiling") == "regional", help="tile overlap, pixels"),
        Dim("attention", ("native", "_native_cudnn", "_native_flash", "_native_efficient")
            if gpu and family in PROMPTED else ("native",), help="diffusers attention backends of torch SDPA"),
        Dim("compile", ("off", "regional") if gpu and hardware.can_compile else ("off",),
            help="regional torch.compile (on a GPU only where Triton is installed)"),
        Dim("compile.fullgraph", (False, True), when=lambda p: p.get("compile") == "regional" and not hooks(p)),
        Dim("compile.fuse_qkv", (False, True),
            when=lambda p: p.get("compile") == "regional" and not p.get("transformer.layerwise_fp8")),
        # flux-fast's coordinate-descent flags cost minutes of compile: on the H200, fp8 + regional compile
        # without them ran 2.87 s (first call 19 s); the flux-fast core with them 2.91 s, and the 12 GB preset
        # with them had a 121 s first call. Whether they pay is measured, not assumed.
        Dim("compile.inductor_flags", (False, True), when=lambda p: p.get("compile") == "regional"),
    ]
    return dims


# Offload choices for the model-offload family must be uniform (accelerate and diffusers hooks don't mix).
_ACCELERATE = ("model", "sequential")


class LazyRankings(Mapping[str, Sequence[str]]):
    """Sensitivity rankings scanned only when a trial first keeps sensitive layers of that method.

    A scan costs minutes on a large model (113 DiT-XL groups in 70-90 s per method on an H200), and most
    searches never reach a trial that keeps layers unquantized; ``scan(method)`` runs once per method
    and returns its exclude patterns, most sensitive first (empty if the scan failed).
    """

    def __init__(self, methods: Sequence[str], scan: Callable[[str], Sequence[str]],
                 done: Mapping[str, Sequence[str]] | None = None) -> None:
        self.methods = tuple(methods)
        self._scan = scan
        self._done: dict[str, tuple[str, ...]] = {m: tuple(p) for m, p in (done or {}).items()}
        self._lock = threading.Lock()  # workers on several GPUs ask from their own threads

    def __getitem__(self, method: str) -> Sequence[str]:
        if method not in self.methods:
            raise KeyError(method)
        with self._lock:
            if method not in self._done:
                self._done[method] = tuple(self._scan(method))
            return self._done[method]

    def __iter__(self) -> Any:
        return iter(self.methods)

    def __len__(self) -> int:
        return len(self.methods)


@dataclass
class SearchSpace:
    """The dimensions of a search plus the fixed parts of every profile it proposes."""

    dims: list[Dim]
    base: Profile
    family: str
    transformer_bytes: int | None = None
    """Bytes of the transformer's repeated blocks (after the trial's quantization: scaled per method)."""
    sensitivity: Mapping[str, Sequence[str]] = field(default_factory=dict)
    """Quantization method -> exclude patterns of its layer groups, most sensitive first."""

    @classmethod
    def create(
        cls,
        hardware: HardwareInfo,
        family: str,
        base: Profile,
        narrow: Mapping[str, Any] | None = None,
        transformer_bytes: int | None = None,
        sensitivity: Mapping[str, Sequence[str]] | None = None,
    ) -> SearchSpace:
        """The space for this machine, family and base profile, narrowed by the user.

        ``sensitivity`` (method -> ranked exclude patterns) adds the dimension of how many of the most
        sensitive groups stay unquantized, for each method that has a ranking; the benefit is not
        monotonic in the count (measured on dit-mini), so the count is searched, not assumed.
        """
        dims = default_dims(hardware, family)
        steps = base.generation.steps
        dims[0] = replace(dims[0], low=steps, high=steps)
        sens: Mapping[str, Sequence[str]] = (
            sensitivity if isinstance(sensitivity, LazyRankings)
            else {m: tuple(p) for m, p in (sensitivity or {}).items() if p})
        by_name = {d.name: d for d in dims}
        by_name["batch"] = replace(by_name["batch"], choices=(base.generation.images_per_prompt,))
        keep = by_name["transformer.keep_sensitive"]
        if isinstance(sens, LazyRankings):  # counts beyond a scan's groups keep them all (to_profile)
            by_name[keep.name] = replace(keep, when=lambda p: _q(p) in sens.methods)
        elif sens:
            longest = max(len(p) for p in sens.values())
            by_name[keep.name] = replace(keep, choices=tuple(n for n in keep.choices if n <= longest),
                                         when=lambda p: _q(p) in sens)
        else:
            by_name[keep.name] = replace(keep, when=lambda p: False)
        for key, spec in (narrow or {}).items():
            if key not in by_name:
                raise ProfileError(f"space: unknown dimension {key!r}; known: {', '.join(by_name)}")
            if key == "size":  # any WIDTHxHEIGHT the user lists is a choice
                sizes = [str(v) for v in (spec if isinstance(spec, list | tuple) else [spec])]
                by_name[key] = replace(by_name[key], choices=tuple(sizes))
                continue
            if key == "batch":  # any positive batch sizes the user lists are choices
                sizes = list(spec) if isinstance(spec, list | tuple) else [spec]
                bad = [b for b in sizes if not isinstance(b, int) or isinstance(b, bool) or b < 1]
                if bad or not sizes:
                    raise ProfileError(f"space: batch={bad[0] if bad else spec!r} is not a positive integer; "
                                       "use e.g. batch: [1, 4, 16]")
                by_name[key] = replace(by_name[key], choices=tuple(sizes))
                continue
            by_name[key] = by_name[key].narrowed(spec)
        sides = [base.generation.height or 0, base.generation.width or 0]
        sides += [int(v) for c in by_name["size"].choices if c != "default" for v in str(c).split("x")]
        if max(sides) <= TILING_FROM_PX and "tiling" not in (narrow or {}):
            for name in ("tiling", "tiling.tile", "tiling.overlap"):
                by_name[name] = replace(by_name[name], when=lambda p: False)
        if (base.generation.negative_prompt is None or family not in TRUE_CFG_FAMILIES) and "batch_cfg" not in (narrow or {}):
            by_name["batch_cfg"] = replace(by_name["batch_cfg"], when=lambda p: False)  # no true CFG to batch
        if len(by_name["batch"].choices) == 1 and by_name["batch"].choices[0] == base.generation.images_per_prompt:
            by_name["batch"] = replace(by_name["batch"], when=lambda p: False)  # the base's batch: nothing to ask
        return cls([by_name[d.name] for d in dims], base, family, transformer_bytes, sens)

    def suggest(self, trial: Any) -> Profile:
        """Define-by-run: ask the trial for each active dimension, return the profile."""
        params: dict[str, Any] = {}
        for dim in self.dims:
            if dim.when(params):
                params[dim.name] = dim.suggest(trial)
        return self.profile(params)

    def profile(self, params: Params) -> Profile:
        """The profile for a full parameter dict (as ``trial.params`` holds it)."""
        data = self.base.to_dict()
        g = data["generation"]
        g["steps"] = int(params.get("steps", g["steps"]))
        g["images_per_prompt"] = int(params.get("batch", g["images_per_prompt"]))
        g["batch_cfg"] = bool(params.get("batch_cfg", g.get("batch_cfg", False)))
        size = str(params.get("size", "default"))
        if size != "default":
            w, _, h = size.partition("x")
            g["width"], g["height"] = int(w), int(h)
        t = data["transformer"]
        q = _q(params)
        if q != "none":
            t["quantize"] = {"method": q}
            if q == "fp8_dynamic":
                t["quantize"]["granularity"] = params.get("transformer.granularity", "row")
            keep = int(params.get("transformer.keep_sensitive", 0))
            if keep:
                ranked = self.sensitivity.get(q, ())
                if isinstance(self.sensitivity, LazyRankings):
                    keep = min(keep, len(ranked))
                if keep > len(ranked):
                    raise ProfileError(f"transformer.keep_sensitive={keep}: the {q} sensitivity scan ranks only "
                                       f"{len(ranked)} groups")
                if keep:
                    t["quantize"]["exclude"] = list(ranked[:keep])
        elif params.get("transformer.layerwise_fp8"):
            t["layerwise_casting"] = {"storage": "float8_e4m3fn"}
        if params.get("modulation.cache"):
            data["modulation"] = {"cache": True}
        if params.get("transformer.fp16_accumulation"):
            t["dtype"] = "float16"
            data["matmul"] = {"fp16_accumulation": True}
        off = _off(params)
        t["offload"] = self._offload(off, params, q)
        if self.family in PROMPTED:
            te = "model" if off == "model" else str(params.get("text_encoders.offload", "none"))
            if off in _ACCELERATE:
                te = off if te != "none" else "none"
            elif te in _ACCELERATE and off in ("group", "partial"):
                te = "group"
            te_off: dict[str, Any] = {"mode": te}
            if te == "group":
                te_off = {"mode": "group", "level": "leaf", "use_stream": True}
            elif te == "partial":
                te_off = {"mode": "partial", "resident_blocks": 0}
            data["text_encoder"]["offload"] = te_off
            if self.family == "flux":  # the others have no text_encoder_2
                data["text_encoder_2"]["offload"] = te_off
            for name in ("text_encoder", "text_encoder_2"):
                if params.get(f"{name}.quantize", "none") != "none":
                    data[name]["quantize"] = {"method": params[f"{name}.quantize"]}
            if off in _ACCELERATE:
                data["vae"]["offload"] = {"mode": off}
        data["vae"]["tiling"] = bool(params.get("vae.tiling", False))
        cache = str(params.get("cache", "none"))
        if cache == "none":
            data["cache"] = {"kind": "none"}
        elif cache == "taylorseer":
            data["cache"] = {"kind": cache, "cache_interval": int(params.get("cache.interval", 5)),
                             "disable_cache_before_step": int(params.get("cache.warmup", 3))}
        else:
            data["cache"] = {"kind": cache, "threshold": round(float(params.get("cache.threshold", 0.08)), 4)}
        if params.get("tiling") == "regional":
            data["tiling"] = {"mode": "regional", "tile": int(params.get("tiling.tile", 1024)),
                              "overlap": int(params.get("tiling.overlap", 128))}
        else:
            data["tiling"] = {"mode": "none"}
        data["attention"] = {"backend": str(params.get("attention", "native"))}
        comp = str(params.get("compile", "off"))
        data["compile"] = {**data["compile"], "mode": comp,
                           "fullgraph": bool(params.get("compile.fullgraph", False)),
                           "fuse_qkv": bool(params.get("compile.fuse_qkv", False)),
                           "inductor_flags": bool(params.get("compile.inductor_flags", True))}
        return validate_profile(data, source="search space")

    def _offload(self, off: str, params: Params, quant: str) -> dict[str, Any]:
        if off == "group":
            level = str(params.get("transformer.group_level", "leaf"))
            out: dict[str, Any] = {"mode": "group", "level": level,
                                   "use_stream": bool(params.get("transformer.use_stream", True))}
            if level == "block":
                out["blocks_per_group"] = int(params.get("transformer.blocks_per_group", 1))
            return out
        if off == "partial":
            frac = float(params.get("transformer.resident_fraction", 0.5))
            if self.transformer_bytes:
                scale = {"none": 1.0, "int4_weight": 0.28}.get(quant, 0.5)
                if quant == "none" and params.get("transformer.layerwise_fp8"):
                    scale = 0.5
                return {"mode": "partial", "resident": max(1, int(frac * self.transformer_bytes * scale))}
            return {"mode": "partial", "resident_blocks": 0}
        return {"mode": off}

    def describe(self, params: Params) -> str:
        """A short one-line summary of a trial's parameters."""
        bits = []
        for key, value in params.items():
            if (key == "steps" and value == self.base.generation.steps) or (
                    key == "batch" and value == self.base.generation.images_per_prompt) or (key, value) in (
                    ("size", "default"), ("attention", "native")):
                continue
            short = key.replace("transformer.", "t.").replace("text_encoder_2.", "t5.").replace("text_encoders.", "te.")
            bits.append(f"{short}={value:.3g}" if isinstance(value, float) else f"{short}={value}")
        return " ".join(bits)


def load_space_file(path: str | Path) -> dict[str, Any]:
    """Read a YAML space file: ``dimension: value | [values] | {low, high}``."""
    from fluxtune.presets import load_data

    data = load_data(path)
    return {str(k): v for k, v in data.items()}


def _pin_value(raw: str) -> Any:
    """A pin's value: ``[a, b]`` is a list, numbers are numbers, true/false are booleans, anything else
    (including YAML 1.1's off/on/yes/no, which are choice names here) stays a string."""
    raw = raw.strip()
    if raw.startswith("[") and raw.endswith("]"):
        return [_pin_value(x) for x in raw[1:-1].split(",") if x.strip()]
    if raw.lower() in ("true", "false"):
        return raw.lower() == "true"
    for cast in (int, float):
        try:
            return cast(raw)
        except ValueError:
            pass
    return raw


def parse_pins(pins: Sequence[str]) -> dict[str, Any]:
    """``--pin KEY=VALUE`` items (VALUE parsed as YAML: lists and numbers work; ``off`` stays a string)."""
    out: dict[str, Any] = {}
    for item in pins:
        key, sep, raw = item.partition("=")
        if not sep:
            raise ProfileError(f"--pin {item!r} is not KEY=VALUE; example: --pin transformer.offload=partial")
        out[key.strip()] = _pin_value(raw)
    return out
