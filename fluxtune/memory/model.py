"""The arithmetic of the memory model: which weights sit on the GPU in each phase, the activations,
and the predicted peaks. Pure arithmetic over :class:`~fluxtune.memory.facts.ModelFacts`; no torch."""

from __future__ import annotations

import functools
import math
import re
from dataclasses import asdict, dataclass
from typing import TYPE_CHECKING, Any

from fluxtune.errors import FluxtuneError, SearchError
from fluxtune.knobs import (
    Component,
    GroupOffload,
    ModelOffload,
    NoOffload,
    PartialResidency,
    Quantize,
    SequentialOffload,
    Vae,
    choose_streamed,
)
from fluxtune.memory.facts import QKV_RE, ComponentFacts, Leaf, ModelFacts
from fluxtune.profile import Profile
from fluxtune.units import format_bytes

if TYPE_CHECKING:
    from fluxtune.memory.calibration import Calibration
    pass


# ------------------------------------------------------------------------------------ constants
# Fitted to the H200 FLUX.1-dev replica runs (module docstring); each says what it stands for.

ACT_BASE_TENSORS, ACT_MLP_TENSORS = 12.0, 2.0
"""Hidden-size tensors alive per token at the transformer's peak: 12 (q, k, v, attention output, norms,
modulated inputs, residuals) plus 2 per unit of MLP ratio (the wide intermediate before and after its
activation): 20 for FLUX and DiT (ratio 4). Fit: model offload peaks at 22.7 GiB = 22.17 GiB of
weights + 4608 tokens x 3072 x 2 B x 20."""

VAE_DECODE_MAPS = 9.4
"""Full-resolution feature maps of the decoder's first width (128 channels) alive at the decode peak.
The upsampler upcasts bf16 to fp32 for the last 2x upsampling of 256 channels. Fit: everything
resident peaks 2.4 GiB above the weights at 1024x1024 (0.6 at 512x512); leaf offload peaks at 2.4."""

TEXT_ACT_HIDDEN, TEXT_ACT_FFN = 8.0, 3.0
"""Text encoder activations per token: 8 hidden-size and 3 FFN-size tensors, plus fp32 attention scores
(T5 computes them eagerly). Fit: block-level offload peaks in the T5 phase at 9.1 GiB = 8.87 + 0.2."""

DEQUANT_BYTES = 6
"""Bytes per weight of the transient copy an eagerly run int8 per-group weight makes at each call: the float32
dequantized weight and its cast to the compute dtype. On the H200 (2026-12-04) these were the allocations
that failed: 1.45 GiB for Qwen3-4B's head (151936 x 2560 x 4 B) and 640 MiB for a Mistral-Small MLP
projection (32768 x 5120 x 4 B). Compiled components fuse it away; the text encoders run eager."""

STREAM_IN_FLIGHT = 2
"""Groups on the GPU at once with streams: the one computing and the one being prefetched."""

DEFAULT_FRAGMENTATION = 1.07
"""reserved / allocated when the allocator is not capped (H200, everything resident: 36.2 / 33.9)."""

DEFAULT_OVERHEAD = 800 * 10**6
"""CUDA context + cuBLAS/cuDNN workspaces outside the caching allocator, charged to the budget (the budget is
the whole process). H200 FLUX preset runs: NVML process peak - allocator reserved peak = 0.79-0.83 GB."""

HOST_PROCESS = 1_400 * 10**6
"""Host memory of the process itself (interpreter, torch, the CUDA libraries, diffusers), charged to
budget.host_ram besides the weights it keeps on the host. H200 host, FLUX.1-dev from a saved directory:
RSS after ``fluxtune.load`` less the host copies of the weights = 1.38 GB (flux-dev-12gb), 1.20 GB
(flux-dev-fast, nothing on the host); docs/results/2026-12-03."""

COMPILE_WORKER = 550 * 10**6
"""Host memory of one of TorchInductor's compile workers (a Python process with torch imported) while the
first call compiles: the RSS of the process and its children rose by 8.4-9.2 GB during the first call
with 16 workers (the H200 host's 16 cores; docs/results/2026-12-03)."""


def compile_workers() -> int:
    """How many compile workers TorchInductor starts here (its default: one per core, at most 32)."""
    import os

    env = os.environ.get("TORCHINDUCTOR_COMPILE_THREADS")
    n = int(env) if env and env.isdigit() else min(32, os.cpu_count() or 1)
    return n if n > 1 else 0  # one thread compiles in the process itself


_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
_PHASE_ORDER = ("text_encoder", "text_encoder_2", "transformer", "vae")


# ------------------------------------------------------------------------------------- profiles


def _compute_bytes(comp: Component, facts: ComponentFacts) -> int:
    return _DTYPE_BYTES[comp.dtype] if comp.dtype else facts.dtype_bytes


@functools.lru_cache(maxsize=256)
def _compiled(patterns: tuple[str, ...]) -> tuple[re.Pattern[str], ...]:
    return tuple(re.compile(p) for p in patterns)


def _lc_skipped(name: str, patterns: tuple[re.Pattern[str], ...]) -> bool:
    # diffusers tests every prefix of the path while recursing, so "norm" skips "blocks.0.norm1.linear".
    parts = name.split(".")
    return any(p.search(".".join(parts[:i])) for i in range(1, len(parts) + 1) for p in patterns)


def quantized_bytes(weight_numel: int, rows: int, q: Quantize) -> float:
    """Bytes of one Linear weight of ``weight_numel`` elements and ``rows`` outputs once ``q`` quantized it."""
    if q.method == "int4_weight":
        # 4-bit values plus a bf16 scale and zero point per group of group_size inputs.
        return weight_numel * 0.5 + weight_numel / q.group_size * 4
    if q.method == "nf4":
        from fluxtune.tuning.nf4 import bytes_per_weight

        return bytes_per_weight(weight_numel)
    if q.method == "int8_weight" and q.tiles(weight_numel // max(rows, 1)):
        return weight_numel * (1.0 + 4 / q.group_size)  # an fp32 scale per group (quantize.torchao_config)
    scales = 4 if q.method.endswith("dynamic") and q.granularity == "tensor" else rows * 4
    return weight_numel * 1.0 + scales


def _quantizes(q: Quantize, excl: tuple[re.Pattern[str], ...], leaf: Leaf, facts: ComponentFacts) -> bool:
    """Whether ``q`` converts this leaf (quantize.linear_filter's rule, and int4 only where its groups tile)."""
    return (leaf.kind == "linear" and leaf.name != facts.output_embedding
            and not any(p.search(leaf.name) for p in excl) and not (q.method == "int4_weight" and not q.tiles(leaf.cols)))


def _dequant_transient(comp: Component, facts: ComponentFacts) -> float:
    """The largest dequantized copy an eager int8 per-group component makes during its call (see DEQUANT_BYTES)."""
    q = comp.quantize
    if q is None or q.method != "int8_weight":
        return 0.0
    excl = _compiled(tuple(q.exclude))
    sizes = [leaf.weight for leaf in facts.leaves if _quantizes(q, excl, leaf, facts) and q.tiles(leaf.cols)]
    return float(DEQUANT_BYTES * max(sizes, default=0))


def _quant_weight_bytes(leaf: Leaf, q: Quantize) -> float:
    return quantized_bytes(leaf.weight, leaf.rows, q)


def _leaf_bytes(comp: Component, facts: ComponentFacts) -> dict[str, float]:
    """Bytes of each leaf under the component's precision knobs."""
    cb = _compute_bytes(comp, facts)
    out: dict[str, float] = {}
    q, lc = comp.quantize, comp.layerwise_casting
    excl = _compiled(tuple(q.exclude)) if q is not None else ()
    skip: tuple[re.Pattern[str], ...] = ()
    if lc is not None:
        user = tuple(lc.skip) if lc.skip is not None else None
        patterns = (user if user is not None else facts.lc_default_skip) + facts.lc_class_skip
        skip = _compiled(patterns)
    for leaf in facts.leaves:
        if q is not None and _quantizes(q, excl, leaf, facts):
            out[leaf.name] = _quant_weight_bytes(leaf, q) + leaf.bias * cb
        elif lc is not None and not _lc_skipped(leaf.name, skip):
            out[leaf.name] = leaf.params * 1.0  # fp8 storage of weight and bias
        else:
            out[leaf.name] = leaf.params * float(cb)
    return out


@dataclass(frozen=True)
class _Weights:
    """A component's weight bytes under a profile, split the ways offload modes need."""

    total: float
    non_block: float
    blocks: dict[str, list[float]]
    largest_leaf: float
    other: float
    fused_extra: float
    stream_blocks: dict[str, list[float]]
    pinned: float
    """Host bytes of a pinned copy made by torch's host allocator (diffusers' group offload with streams),
    which rounds every allocation up to a power of two (see :func:`_pinned_bytes`)."""


def _pinned_bytes(nbytes: float) -> float:
    """What torch's caching host allocator takes for one pinned tensor: its size rounded up to a power of
    two (``CachingHostAllocator``, default ``pinned_max_round_threshold``). Measured on the H200: leaf-level
    group offload with streams held 1.4-1.7x its weights in host RSS (FLUX.2 [klein] 4B: 25.7 GB for 15.8 GB
    of bf16 weights; Qwen-Image 98.6 GB for 57.5 GB)."""
    return float(1 << max(0, math.ceil(math.log2(nbytes)))) if nbytes >= 1 else 0.0


def _block_rows(lists: dict[str, tuple[int, ...]], leaves: tuple[Leaf, ...], per_leaf: dict[str, float],
                cb: int) -> dict[str, list[float]]:
    """Bytes of every block of ``lists`` under a profile: its leaves at their (quantized) size plus its
    other parameters at the compute dtype. A leaf belongs to the block whose name prefixes its own."""
    acc: dict[str, list[float]] = {f"{k}.{i}": [0.0, 0.0] for k, sizes in lists.items() for i in range(len(sizes))}
    for leaf in leaves:
        parts = leaf.name.split(".")
        for cut in range(len(parts) - 1, 0, -1):
            hit = acc.get(".".join(parts[:cut]))
            if hit is not None:
                hit[0] += per_leaf[leaf.name]
                hit[1] += leaf.params
                break
    return {k: [acc[f"{k}.{i}"][0] + (n - acc[f"{k}.{i}"][1]) * cb for i, n in enumerate(sizes)]
            for k, sizes in lists.items()}


def _profile_facts(profile: Profile, facts: ModelFacts) -> tuple[dict[str, ComponentFacts], float]:
    """Each component's facts as the profile leaves it on the pipeline, and the bytes it moves to host
    memory besides offloading (``modulation.cache``: the transformer's modulation weights, in its dtype)."""
    out = dict(facts.components)
    t = out.get("transformer")
    if t is None or not profile.modulation.cache:
        return out, 0.0
    out["transformer"], removed = t.without_modulation()
    # float8 with a scale per row where the transformer is quantized (fluxtune.tuning.modcache.HostLinear)
    per = 1 if profile.transformer.quantize is not None else _compute_bytes(profile.component("transformer"), t)
    return out, float(removed * per)


def _component_weights(comp: Component, facts: ComponentFacts, fuse_qkv: bool) -> _Weights:
    cb = _compute_bytes(comp, facts)
    per_leaf = _leaf_bytes(comp, facts)
    blocks = _block_rows(facts.blocks, facts.leaves, per_leaf, cb)
    stream_blocks = blocks if facts.stream_blocks is None else _block_rows(facts.stream_blocks, facts.leaves,
                                                                           per_leaf, cb)
    fused = 0.0
    if fuse_qkv:
        # diffusers' fuse_projections adds to_qkv and keeps to_q/k/v: the fused copy is extra
        # (H200: +4.0 GiB for FLUX in bf16). It is quantized like the layers it copies.
        fused = sum(per_leaf[leaf.name] for leaf in facts.leaves if QKV_RE.search(leaf.name))
    other = facts.other_params * float(cb) + facts.buffer_bytes
    total = sum(per_leaf.values()) + other + fused
    in_blocks = sum(sum(r) for r in blocks.values())
    largest = max(per_leaf.values(), default=0.0)
    # Each leaf's weight is pinned as its own tensor(s); the bias and the small parameters are left unrounded.
    pinned = sum(_pinned_bytes(size) for size in per_leaf.values()) + other + fused
    return _Weights(total=total, non_block=max(0.0, total - in_blocks), blocks=blocks, largest_leaf=largest,
                    other=other, fused_extra=fused, stream_blocks=stream_blocks, pinned=pinned)


def offload_family(offload: Any) -> str:
    """The calibration bucket of an offload setting: none, model, sequential, group-leaf, group-block, partial."""
    if isinstance(offload, GroupOffload):
        return f"group-{offload.level}"
    return str(getattr(offload, "mode", "none"))


def _on_gpu(offload: Any, w: _Weights, active: bool) -> tuple[float, float]:
    """(weights on the GPU during a phase, of which in flight only while active)."""
    if isinstance(offload, NoOffload):
        return w.total, 0.0
    if isinstance(offload, ModelOffload):
        return (w.total, 0.0) if active else (0.0, 0.0)
    if isinstance(offload, SequentialOffload):
        return (w.largest_leaf + w.other, 0.0) if active else (0.0, 0.0)
    if isinstance(offload, GroupOffload):
        if not active:
            return 0.0, 0.0
        inflight = STREAM_IN_FLIGHT if offload.use_stream else 1
        if offload.level == "leaf":
            return inflight * w.largest_leaf + w.other, 0.0
        per_group = 1 if offload.use_stream else offload.blocks_per_group  # streams force 1 block/group
        group = max(
            (sum(row[i:i + per_group]) for row in w.blocks.values() for i in range(0, len(row), per_group)),
            default=0.0,
        )
        return w.non_block + min(inflight * group, w.total - w.non_block), 0.0
    if isinstance(offload, PartialResidency):
        order = [s for row in w.stream_blocks.values() for s in row]
        streamed = choose_streamed(order, offload.resident, offload.resident_blocks)
        resident = w.total - sum(order[i] for i in streamed)
        largest = max((order[i] for i in streamed), default=0.0)
        return resident, (offload.prefetch + 1) * largest * min(1, len(streamed)) if active else 0.0
    raise FluxtuneError(f"memory model: unknown offload {offload!r}")  # pragma: no cover


def _host_bytes(offload: Any, w: _Weights) -> float:
    if isinstance(offload, NoOffload):
        return 0.0
    if isinstance(offload, GroupOffload) and offload.disk_path:
        largest = max((s for row in w.blocks.values() for s in row), default=w.largest_leaf)
        return 2 * max(largest, w.largest_leaf)  # groups are read back from safetensors one at a time
    if isinstance(offload, PartialResidency):
        order = [s for row in w.stream_blocks.values() for s in row]
        return sum(order[i] for i in choose_streamed(order, offload.resident, offload.resident_blocks))
    if isinstance(offload, GroupOffload) and offload.use_stream and not offload.low_cpu_mem_usage:
        return w.pinned  # a pinned copy of each tensor, from torch's host allocator
    # model / sequential / group without streams: the weights live on the host, as they are.
    return w.total


# ----------------------------------------------------------------------------------- prediction


@dataclass(frozen=True)
class Prediction:
    """What :func:`predict` expects a profile to need.

    ``peak_vram`` is the number to compare with a budget: ``peak_reserved`` (allocator, after
    fragmentation) + ``overhead`` (CUDA context and workspaces). ``breakdown`` lists the model terms
    of the peak phase before calibration: ``sum(breakdown without "overhead") * calibration_ratio``
    is ``peak_allocated``. ``phases`` gives the calibrated allocator bytes of every phase.
    """

    peak_vram: int
    peak_allocated: int
    peak_reserved: int
    resident_weights: int
    activations: int
    vae_decode: int
    overhead: int
    host_ram: int
    peak_phase: str
    family: str
    phases: dict[str, int]
    breakdown: dict[str, int]
    calibration_ratio: float = 1.0
    weights_floor: int = 0
    """The most weight bytes that must be on the GPU at one moment (the largest phase, activations,
    calibration and fragmentation left out): a cap below it certainly does not fit."""
    weights_floor_phase: str = "none"

    def exceeds(self, budget: int, *, tolerance: float = 0.1) -> bool:
        """True when the profile certainly does not fit: ``peak_vram > budget * (1 + tolerance)``."""
        return self.peak_vram > budget * (1.0 + tolerance)

    def describe(self) -> str:
        """One line: the peak, where it happens, and its largest terms."""
        terms = sorted(((v, k) for k, v in self.breakdown.items() if v > 0), reverse=True)[:4]
        parts = ", ".join(f"{k} {format_bytes(v)}" for v, k in terms)
        return (f"predicted peak {format_bytes(self.peak_vram)} (reserved {format_bytes(self.peak_reserved)}, "
                f"allocated {format_bytes(self.peak_allocated)}) during {self.peak_phase}: {parts}")

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def _text_activations(shape: dict[str, Any], tokens: int, batch: int, cb: int) -> float:
    hidden, ffn, heads = shape.get("hidden", 768), shape.get("ffn", 3072), shape.get("heads", 12)
    per_token = hidden * TEXT_ACT_HIDDEN + ffn * TEXT_ACT_FFN
    return batch * tokens * per_token * cb + batch * heads * tokens * tokens * 4 * 2


def predict(
    profile: Profile,
    facts: ModelFacts,
    *,
    batch: int | None = None,
    height: int | None = None,
    width: int | None = None,
    calibration: Calibration | None = None,
    overhead: int = DEFAULT_OVERHEAD,
    fragmentation: float = DEFAULT_FRAGMENTATION,
) -> Prediction:
    """Predict the peak GPU memory (and host memory) of a profile on a model.

    Args:
        profile: the profile; its generation section gives the size, text length and batch.
        facts: the model's facts (:meth:`ModelFacts.for_builtin` / :meth:`ModelFacts.from_pipeline`).
        batch: images per call (DiT: class labels x images per label); default
            ``profile.generation.images_per_prompt``.
        height: pixels; default the profile's, else the model's default. Ignored by fixed-size models.
        width: as ``height``.
        calibration: a learnt correction applied to the allocator peak.
        overhead: bytes outside the caching allocator (CUDA context, workspaces).
        fragmentation: reserved / allocated.

    Returns:
        The :class:`Prediction`.
    """
    g = profile.generation
    batch = int(batch or g.images_per_prompt)
    if facts.fixed_size:
        h, w = facts.default_height, facts.default_width
    else:
        h = int(height or g.height or facts.default_height)
        w = int(width or g.width or facts.default_width)
    present = [n for n in _PHASE_ORDER if n in facts.components]
    comp_facts, host_extra = _profile_facts(profile, facts)
    weights = {
        n: _component_weights(profile.component(n), comp_facts[n],
                              fuse_qkv=profile.compile.fuse_qkv and n in ("transformer", "vae"))
        for n in present
    }

    # Activations of each phase.
    acts: dict[str, float] = {}
    for n in present:
        c, cf = profile.component(n), facts.components[n]
        cb = _compute_bytes(c, cf)
        if n.startswith("text_encoder"):
            tokens = cf.shape.get("max_tokens") or g.max_sequence_length
            acts[n] = _text_activations(cf.shape, int(tokens), batch, cb) + _dequant_transient(c, cf)
        elif n == "transformer":
            th, tw = h, w
            if profile.tiling.mode == "regional":
                # Regional denoising runs one tile at a time: activations follow the tile; the blended
                # prediction and its weights (float32, the whole latent) come on top.
                th, tw = min(h, profile.tiling.tile), min(w, profile.tiling.tile)
            tokens = th * tw / facts.pixels_per_token + (g.max_sequence_length if facts.text_tokens else 0)
            # DiT's CFG and batched true CFG (generation.batch_cfg) run both rows in one forward.
            rows = batch * (2 if (facts.cfg_doubles_batch and g.guidance > 1)
                            or (g.batch_cfg and g.negative_prompt is not None) else 1)
            per_token = facts.hidden_size * cb
            act = rows * tokens * per_token * (ACT_BASE_TENSORS + ACT_MLP_TENSORS * facts.mlp_ratio)
            if (th, tw) != (h, w):
                act += rows * h * w / facts.pixels_per_token * 64 * 4 * 2  # 64 packed channels, sum + output
            if profile.cache.kind != "none":
                act += rows * tokens * per_token * 4  # cached residuals carried across steps
            acts[n] = act
        elif n == "vae":
            acts[n] = _vae_activations(profile.vae, cf, batch, h, w, cb)
        else:  # pragma: no cover - COMPONENTS is closed
            acts[n] = 0.0
        if calibration is not None:
            acts[n] *= calibration.activation_ratio(n)

    phases: dict[str, float] = {}
    terms: dict[str, dict[str, float]] = {}
    for phase in present:
        row: dict[str, float] = {}
        for n in present:
            base, inflight = _on_gpu(profile.component(n).offload, weights[n], active=(n == phase))
            row[n] = base + inflight
        row[f"activations:{phase}"] = acts[phase]
        terms[phase] = row
        phases[phase] = sum(row.values())
    peak_phase = max(phases, key=lambda p: phases[p]) if phases else "none"
    weight_sums = {p: sum(v for k, v in row.items() if not k.startswith("activations:")) for p, row in terms.items()}
    floor_phase = max(weight_sums, key=lambda p: weight_sums[p]) if weight_sums else "none"
    raw_peak = phases.get(peak_phase, 0.0)
    fam = offload_family(profile.component(peak_phase).offload) if peak_phase in facts.components else "none"
    ratio = calibration.ratio(fam) if calibration is not None else 1.0

    allocated = raw_peak * ratio
    reserved = allocated * fragmentation
    host = HOST_PROCESS + host_extra + sum(_host_bytes(profile.component(n).offload, weights[n]) for n in present)
    if profile.compile.enabled:
        host += COMPILE_WORKER * compile_workers()
    peak_terms = terms.get(peak_phase, {})
    return Prediction(
        peak_vram=int(reserved + overhead),
        peak_allocated=int(allocated),
        peak_reserved=int(reserved),
        resident_weights=int(sum(v for k, v in peak_terms.items() if not k.startswith("activations:"))),
        activations=int(acts.get("transformer", 0.0)),
        vae_decode=int(acts.get("vae", 0.0)),
        overhead=int(overhead),
        host_ram=int(host),
        peak_phase=peak_phase,
        family=fam,
        phases={p: int(v * ratio) for p, v in phases.items()},
        breakdown={**{k: int(v) for k, v in peak_terms.items()}, "overhead": int(overhead)},
        calibration_ratio=ratio,
        weights_floor=int(weight_sums.get(floor_phase, 0.0)),
        weights_floor_phase=floor_phase,
    )


def _vae_activations(vae: Vae, cf: ComponentFacts, batch: int, h: int, w: int, cb: int) -> float:
    widths = cf.shape.get("widths") or [128]
    scale = int(cf.shape.get("scale", 8))
    tile = int(vae.tile_size or cf.shape.get("tile_size", 512))
    images = 1 if vae.slicing else batch
    area_h, area_w, out = h, w, 0.0
    # diffusers tiles only when the latent exceeds the tile's latent size.
    if vae.tiling and (h // scale > tile // scale or w // scale > tile // scale):
        area_h, area_w = min(h, tile), min(w, tile)
        out = batch * 3 * h * w * cb * 2  # decoded tiles and the blended image
    return images * area_h * area_w * widths[0] * cb * VAE_DECODE_MAPS + out





def smallest_feasible_budget(
    facts: ModelFacts, profiles: list[Profile], *, calibration: Calibration | None = None, batch: int | None = None
) -> tuple[int, Profile]:
    """The smallest predicted ``peak_vram`` among candidate profiles, and the profile.

    Raises:
        SearchError: no candidates.
    """
    if not profiles:
        raise SearchError("smallest_feasible_budget: no candidate profiles; pass at least one")
    scored = [(predict(p, facts, batch=batch, calibration=calibration).peak_vram, i) for i, p in enumerate(profiles)]
    peak, i = min(scored)
    return peak, profiles[i]


def default_host_budget(total: int) -> int:
    """``budget.host_ram`` when a profile sets none: the machine's memory less max(4 GiB, 1/8) for the
    OS, the desktop and the page cache (a 32 GiB machine: 28 GiB)."""
    return int(total - max(4 * 2**30, total / 8))


def check_host_ram(prediction: Prediction, host_ram_budget: int | None) -> str | None:
    """A one-line message when the offload modes need more host memory than allowed, else None."""
    if host_ram_budget is None or prediction.host_ram <= host_ram_budget:
        return None
    return (
        f"needs about {format_bytes(prediction.host_ram)} of host memory (the process, the host copies of streamed "
        f"and offloaded weights, and compile workers on the first call) but budget.host_ram="
        f"{format_bytes(host_ram_budget)}: quantize the offloaded components, keep more resident, set "
        "TORCHINDUCTOR_COMPILE_THREADS=1, or raise budget.host_ram"
    )


def transfer_bytes(profile: Profile, facts: ModelFacts) -> dict[str, tuple[float, str]]:
    """Weight bytes each component moves host->device, and how often: per denoising ``"step"`` or per ``"call"``.

    The same rules as :func:`_on_gpu` / :func:`_host_bytes`: resident components move nothing; model
    offload moves the whole component once per call; sequential offload moves every leaf each time the
    component runs; group offload moves every offloaded byte each run (leaf level: all but the
    non-leaf parameters; block level: all but the non-block part); partial residency moves the blocks
    :func:`choose_streamed` streams. The transformer runs every step, the text encoders and the VAE
    once per call.
    """
    out: dict[str, tuple[float, str]] = {}
    for n in _PHASE_ORDER:
        if n not in facts.components:
            continue
        offload = profile.component(n).offload
        w = _component_weights(profile.component(n), _profile_facts(profile, facts)[0][n],
                                fuse_qkv=profile.compile.fuse_qkv and n in ("transformer", "vae"))
        per_run = "step" if n == "transformer" else "call"
        if isinstance(offload, NoOffload):
            out[n] = (0.0, "call")
        elif isinstance(offload, ModelOffload):
            out[n] = (w.total, "call")
        elif isinstance(offload, SequentialOffload):
            out[n] = (w.total, per_run)
        elif isinstance(offload, GroupOffload):
            kept = w.other if offload.level == "leaf" else w.non_block
            out[n] = (max(0.0, w.total - kept), per_run)
        elif isinstance(offload, PartialResidency):
            order = [s for row in w.stream_blocks.values() for s in row]
            streamed = choose_streamed(order, offload.resident, offload.resident_blocks)
            out[n] = (float(sum(order[i] for i in streamed)), per_run)
        else:  # pragma: no cover - the offload union is closed
            out[n] = (0.0, "call")
    return out
