"""The analytic VRAM (and host RAM) model: predict a profile's peak before running it.

The search uses it to skip trials that certainly cannot fit a budget, and to say what the smallest
budget the model can predict is. It is arithmetic over :class:`ModelFacts` (parameter counts per
component, per layer and per block, and the shapes that size activations), so importing this module
and calling :func:`predict` never needs torch; only building facts from modules does.

How the peak is modelled. A call runs in phases, one component active at a time: ``text_encoder``
(CLIP), ``text_encoder_2`` (T5), ``transformer`` (all denoising steps), ``vae`` (decode). In each
phase the GPU holds (a) the weights of every component that is resident at that moment, which
depends on its offload mode, and (b) the activations of the active component. The allocator peak
is the largest phase. The constants below were fitted to allocator peaks of the FLUX.1-dev replica
on an H200 (reference/h200-measurements.md; its "GB" columns are GiB: at 512x512 the peak, 32.1,
is above the 31.4 GiB of weights only when read as GiB), all in GiB:

  profile (FLUX 1024x1024, 512 text tokens, bf16)      measured   predicted
  everything resident                                  33.9       33.8
  everything resident, 512x512                         32.1       32.0
  model offload                                        22.7       22.7
  group offload, leaf level, streams                    2.4        2.4
  group offload, block level, streams                   9.1        9.1  (T5 has no block list)
  int8 weight-only transformer                         22.8       22.7
  fuse_qkv + compile + fp8 rowwise transformer         24.8       24.7  (fusing keeps q/k/v too)
  DiT-XL/2 256x256, batch 1 / batch 16           1.77 / 3.62  1.70 / 3.90

Three numbers come out: ``peak_allocated`` (what ``torch.cuda.max_memory_allocated`` reports),
``peak_reserved`` = allocated x a fragmentation factor (what ``set_per_process_memory_fraction``
caps, so what must fit under an enforced budget), and ``peak_vram`` = reserved + a constant CUDA
context/workspace overhead (what NVML reports for the process, and what the budget is compared with).
Uncapped runs reserve more than they need (cached blocks are not returned), so measured
``peak_reserved`` of an uncapped run overstates the need; calibrate on allocated peaks.
"""

from __future__ import annotations

import functools
import json
import math
import re
import statistics
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

from fluxtune.errors import FluxtuneError, PipelineError, SearchError
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
from fluxtune.profile import COMPONENTS, Profile
from fluxtune.units import format_bytes

if TYPE_CHECKING:
    import torch

__all__ = [
    "DEFAULT_FRAGMENTATION",
    "DEFAULT_OVERHEAD",
    "Calibration",
    "ComponentFacts",
    "Leaf",
    "ModelFacts",
    "Prediction",
    "check_host_ram",
    "offload_family",
    "predict",
    "smallest_feasible_budget",
]


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

STREAM_IN_FLIGHT = 2
"""Groups on the GPU at once with streams: the one computing and the one being prefetched."""

DEFAULT_FRAGMENTATION = 1.07
"""reserved / allocated when the allocator is not capped (H200, everything resident: 36.2 / 33.9)."""

DEFAULT_OVERHEAD = 800 * 10**6
"""CUDA context + cuBLAS/cuDNN workspaces outside the caching allocator, charged to the budget (the budget is
the whole process). H200 FLUX preset runs: NVML process peak - allocator reserved peak = 0.79-0.83 GB."""

_QKV_RE = re.compile(r"(^|\.)(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj)$")
_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "float32": 4}
_PHASE_ORDER = ("text_encoder", "text_encoder_2", "transformer", "vae")

# ---------------------------------------------------------------------------------------- facts


@dataclass(frozen=True)
class Leaf:
    """One Linear / Conv / Embedding layer: what quantization, casting and leaf offload act on."""

    name: str
    kind: Literal["linear", "conv", "embedding"]
    weight: int
    bias: int
    rows: int
    cols: int

    @property
    def params(self) -> int:
        return self.weight + self.bias

    def to_list(self) -> list[Any]:
        return [self.name, self.kind, self.weight, self.bias, self.rows, self.cols]

    @classmethod
    def from_list(cls, row: list[Any]) -> Leaf:
        return cls(*row)


@dataclass(frozen=True)
class ComponentFacts:
    """Parameter facts of one pipeline component, as loaded.

    ``blocks`` maps each block list (a ModuleList/Sequential child; for the VAE also inside the
    encoder/decoder, as diffusers' block-level group offload recurses there) to the parameters of
    each block. ``shape`` holds the sizes activations are computed from.
    """

    name: str
    class_name: str
    params: int
    dtype_bytes: int
    buffer_bytes: int
    leaves: tuple[Leaf, ...]
    blocks: dict[str, tuple[int, ...]]
    lc_default_skip: tuple[str, ...] = ()
    lc_class_skip: tuple[str, ...] = ()
    shape: dict[str, Any] = field(default_factory=dict)
    stream_blocks: dict[str, tuple[int, ...]] | None = None
    """The block lists partial residency streams (outermost ModuleLists: T5's ``encoder.block`` too),
    with each block's parameters; None means the same as ``blocks``."""

    @property
    def bytes(self) -> int:
        """Bytes of parameters and buffers as loaded."""
        return self.params * self.dtype_bytes + self.buffer_bytes

    @property
    def linear_params(self) -> int:
        """Parameters in nn.Linear weights: the part torchao quantizes."""
        return sum(leaf.weight for leaf in self.leaves if leaf.kind == "linear")

    @property
    def leaf_params(self) -> int:
        return sum(leaf.params for leaf in self.leaves)

    @property
    def other_params(self) -> int:
        """Parameters outside Linear/Conv/Embedding layers (norm scales, learned embeddings)."""
        return self.params - self.leaf_params

    @property
    def block_params(self) -> int:
        return sum(sum(sizes) for sizes in self.blocks.values())

    @property
    def non_block_params(self) -> int:
        """Parameters outside every block list (embedders, final norm and projection)."""
        return self.params - self.block_params

    @property
    def largest_leaf_params(self) -> int:
        return max((leaf.params for leaf in self.leaves), default=0)

    @property
    def qkv_params(self) -> int:
        """Parameters of the q/k/v projections: fusing them adds a fused copy (the originals stay)."""
        return sum(leaf.params for leaf in self.leaves if _QKV_RE.search(leaf.name))

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["leaves"] = [leaf.to_list() for leaf in self.leaves]
        out["blocks"] = {k: list(v) for k, v in self.blocks.items()}
        if self.stream_blocks is not None:
            out["stream_blocks"] = {k: list(v) for k, v in self.stream_blocks.items()}
        out["lc_default_skip"] = list(self.lc_default_skip)
        out["lc_class_skip"] = list(self.lc_class_skip)
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ComponentFacts:
        data = dict(data)
        data["leaves"] = tuple(Leaf.from_list(row) for row in data["leaves"])
        data["blocks"] = {k: tuple(v) for k, v in data["blocks"].items()}
        if data.get("stream_blocks") is not None:
            data["stream_blocks"] = {k: tuple(v) for k, v in data["stream_blocks"].items()}
        data["lc_default_skip"] = tuple(data.get("lc_default_skip", ()))
        data["lc_class_skip"] = tuple(data.get("lc_class_skip", ()))
        return cls(**data)


@dataclass(frozen=True)
class ModelFacts:
    """Everything :func:`predict` needs to know about a pipeline, without the pipeline.

    ``pixels_per_token`` turns an image size into transformer image tokens (FLUX: 16x16 pixels per
    packed latent token; DiT-XL/2: (8 x patch 2)^2); ``text_tokens`` is the transformer's default
    text sequence (FLUX: 512 T5 tokens; DiT: 0). ``fixed_size`` means the model draws one size only.
    """

    name: str
    family: str
    components: dict[str, ComponentFacts]
    default_height: int
    default_width: int
    fixed_size: bool
    pixels_per_token: int
    text_tokens: int
    hidden_size: int
    num_heads: int
    mlp_ratio: float = 4.0
    cfg_doubles_batch: bool = False

    @property
    def total_params(self) -> int:
        return sum(c.params for c in self.components.values())

    @property
    def total_bytes(self) -> int:
        return sum(c.bytes for c in self.components.values())

    def to_dict(self) -> dict[str, Any]:
        """JSON-safe plain data (stored with a study)."""
        out = {k: v for k, v in asdict(self).items() if k != "components"}
        out["components"] = {name: c.to_dict() for name, c in self.components.items()}
        return out

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelFacts:
        """Inverse of :meth:`to_dict`.

        Raises:
            FluxtuneError: the data is not a ModelFacts dump.
        """
        try:
            data = dict(data)
            data["components"] = {n: ComponentFacts.from_dict(c) for n, c in data["components"].items()}
            return cls(**data)
        except (KeyError, TypeError, ValueError) as e:
            raise FluxtuneError(f"model facts: not a ModelFacts dump ({type(e).__name__}: {e})") from None

    @classmethod
    def from_pipeline(cls, pipe: Any, *, name: str | None = None) -> ModelFacts:
        """Measure the facts from a pipeline's modules (meta-device modules work: no data is read).

        Call it before ``apply``: a quantized or offloaded pipeline reports its changed parameters.

        Args:
            pipe: a diffusers pipeline (FLUX or DiT family; others get generic facts).
            name: a label stored with the facts; the pipeline class name by default.

        Returns:
            The facts.
        """
        from fluxtune.pipelines import family as pipe_family
        from fluxtune.pipelines import module_components

        fam = pipe_family(pipe)
        modules = {n: m for n, m in module_components(pipe).items() if n in COMPONENTS}
        comps = {n: _component_facts(n, m) for n, m in modules.items()}
        vae_scale = int(comps["vae"].shape.get("scale", 8)) if "vae" in comps else 8
        t = modules.get("transformer")
        tcfg = getattr(t, "config", {}) if t is not None else {}
        heads = int(tcfg.get("num_attention_heads", 1) or 1)
        hidden = heads * int(tcfg.get("attention_head_dim", 64) or 64)
        patch = int(tcfg.get("patch_size", 1) or 1)
        if fam == "dit":
            side = int(tcfg.get("sample_size", 32)) * vae_scale
            height = width = side
            ppt = (vae_scale * patch) ** 2
            text_tokens, fixed, cfg = 0, True, True
        else:
            # FLUX packs 2x2 latent pixels into one token.
            sample = int(getattr(pipe, "default_sample_size", 128))
            height = width = sample * int(getattr(pipe, "vae_scale_factor", vae_scale))
            ppt = (vae_scale * 2 * patch) ** 2
            text_tokens, fixed, cfg = 512, False, False
        return cls(
            name=name or type(pipe).__name__, family=fam, components=comps, default_height=height,
            default_width=width, fixed_size=fixed, pixels_per_token=ppt, text_tokens=text_tokens,
            hidden_size=hidden, num_heads=heads, mlp_ratio=4.0, cfg_doubles_batch=cfg,
        )

    @classmethod
    def for_builtin(cls, name: str) -> ModelFacts:
        """Facts of a built-in model (``flux-dev-replica``, ``dit-xl-2-256``, ``tiny-flux``, ...).

        Full-size replicas are built on the meta device (no memory, a few seconds for FLUX); the result
        is cached for the process.

        Raises:
            PipelineError: ``name`` is not a built-in.
        """
        return _builtin_facts(name)


@functools.cache
def _builtin_facts(name: str) -> ModelFacts:
    from fluxtune.pipelines import BUILTINS, list_builtins, load

    names = [spec.name for spec in list_builtins()]
    if name not in BUILTINS:
        raise PipelineError(f"model facts: {name!r} is not a built-in; use one of {', '.join(names)}")
    spec = BUILTINS[name]
    # Replicas: the same builder on the meta device, so the facts are exactly those of the GPU build.
    device = "meta" if spec.needs_gpu else None
    pipe = load(name, device=device, dtype="bfloat16")
    return ModelFacts.from_pipeline(pipe, name=name)


def _leaf_kind(module: torch.nn.Module) -> str | None:
    import torch

    if isinstance(module, torch.nn.Linear):
        return "linear"
    if isinstance(module, torch.nn.Embedding):
        return "embedding"
    if isinstance(module, torch.nn.modules.conv._ConvNd):
        return "conv"
    return None


def _block_lists(module: torch.nn.Module, prefix: str = "") -> dict[str, list[torch.nn.Module]]:
    """Block lists as diffusers' block-level group offload sees them (ModuleList/Sequential children,
    recursing into the model's ``_group_offload_block_modules``)."""
    import torch

    out: dict[str, list[torch.nn.Module]] = {}
    recurse = set(getattr(module, "_group_offload_block_modules", None) or ())
    for child_name, child in module.named_children():
        full = f"{prefix}{child_name}"
        if child_name in recurse:
            out.update(_block_lists(child, f"{full}."))
        elif isinstance(child, torch.nn.ModuleList | torch.nn.Sequential):
            out[full] = list(child)
    return out


def _component_facts(name: str, module: torch.nn.Module) -> ComponentFacts:
    import torch

    params = list(module.parameters())  # deduplicates tied weights (T5's shared embedding)
    n_params = sum(p.numel() for p in params)
    by_dtype: dict[int, int] = {}
    for p in params:
        if p.is_floating_point():
            by_dtype[p.element_size()] = by_dtype.get(p.element_size(), 0) + p.numel()
    dtype_bytes = max(by_dtype, key=lambda k: by_dtype[k]) if by_dtype else 2
    buffer_bytes = sum(b.numel() * b.element_size() for b in module.buffers())

    blocks = {name: tuple(sum(p.numel() for p in b.parameters()) for b in items)
              for name, items in _block_lists(module).items()}

    seen: set[int] = set()
    leaves: list[Leaf] = []
    for mod_name, mod in module.named_modules():
        kind = _leaf_kind(mod)
        weight = getattr(mod, "weight", None)
        if kind is None or not isinstance(weight, torch.Tensor) or id(weight) in seen:
            continue
        seen.add(id(weight))
        bias = getattr(mod, "bias", None)
        rows, cols = int(weight.shape[0]), int(weight[0].numel()) if weight.dim() > 1 else 1
        leaves.append(Leaf(
            name=mod_name, kind=kind, weight=int(weight.numel()),  # type: ignore[arg-type]
            bias=int(bias.numel()) if isinstance(bias, torch.Tensor) else 0, rows=rows, cols=cols,
        ))

    lc_default: tuple[str, ...]
    lc_class: tuple[str, ...] = ()
    try:
        from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN
        from diffusers.models.modeling_utils import ModelMixin
    except ImportError:  # pragma: no cover - diffusers is a core dependency
        lc_default, is_diffusers = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$"), False
    else:
        lc_default, is_diffusers = tuple(DEFAULT_SKIP_MODULES_PATTERN), isinstance(module, ModelMixin)
    if is_diffusers:
        # enable_layerwise_casting adds these even to user-given patterns (diffusers-knobs.md §2.2).
        lc_class = tuple(getattr(module, "_keep_in_fp32_modules", None) or ()) + tuple(
            getattr(module, "_skip_layerwise_casting_patterns", None) or ()
        )
    from fluxtune.tuning.streaming import repeated_blocks

    streamed: dict[str, list[int]] = {}
    for block_name, b in repeated_blocks(module):
        streamed.setdefault(block_name.rsplit(".", 1)[0], []).append(sum(p.numel() for p in b.parameters()))
    stream_blocks = {k: tuple(v) for k, v in streamed.items()}
    return ComponentFacts(
        name=name, class_name=type(module).__name__, params=n_params, dtype_bytes=dtype_bytes,
        buffer_bytes=buffer_bytes, leaves=tuple(leaves), blocks=blocks, lc_default_skip=lc_default,
        lc_class_skip=lc_class, shape=_shape_facts(name, module),
        stream_blocks=None if stream_blocks == blocks else stream_blocks,
    )


def _shape_facts(name: str, module: torch.nn.Module) -> dict[str, Any]:
    cfg = getattr(module, "config", None)
    if cfg is None:
        return {}

    def get(*keys: str, default: Any = None) -> Any:
        for k in keys:
            value = cfg.get(k) if isinstance(cfg, dict) else getattr(cfg, k, None)
            if value is not None:
                return value
        return default

    if name == "vae":
        widths = [int(w) for w in get("block_out_channels", default=(128, 256, 512, 512))]
        tile = get("sample_size", default=512)
        tile = int(tile[0] if isinstance(tile, list | tuple) else tile)
        return {"widths": widths, "latent_channels": int(get("latent_channels", default=4)), "tile_size": tile,
                "scale": 2 ** (len(widths) - 1)}
    if name.startswith("text_encoder"):
        hidden = int(get("d_model", "hidden_size", default=768))
        is_t5 = get("d_model") is not None
        return {
            "hidden": hidden,
            "ffn": int(get("d_ff", "intermediate_size", default=4 * hidden)),
            "heads": int(get("num_heads", "num_attention_heads", default=12)),
            # T5's sequence is the call's max_sequence_length (None here); CLIP always pads to 77.
            "max_tokens": None if is_t5 else int(get("max_position_embeddings", default=77)),
        }
    return {}


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


def _quant_weight_bytes(leaf: Leaf, q: Quantize) -> float:
    if q.method == "int4_weight":
        # 4-bit values plus a bf16 scale and zero point per group of group_size inputs.
        return leaf.weight * 0.5 + leaf.weight / q.group_size * 4
    scales = 4 if q.method.endswith("dynamic") and q.granularity == "tensor" else leaf.rows * 4
    return leaf.weight * 1.0 + scales


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
        if q is not None and leaf.kind == "linear" and not any(p.search(leaf.name) for p in excl) and not (
            q.method == "int4_weight" and leaf.cols % q.group_size
        ):
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
        fused = sum(per_leaf[leaf.name] for leaf in facts.leaves if _QKV_RE.search(leaf.name))
    other = facts.other_params * float(cb) + facts.buffer_bytes
    total = sum(per_leaf.values()) + other + fused
    in_blocks = sum(sum(r) for r in blocks.values())
    largest = max(per_leaf.values(), default=0.0)
    return _Weights(total=total, non_block=max(0.0, total - in_blocks), blocks=blocks, largest_leaf=largest,
                    other=other, fused_extra=fused, stream_blocks=stream_blocks)


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
    # model / sequential: the weights live on the host; group with streams: a pinned copy of each.
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
    weights = {
        n: _component_weights(profile.component(n), facts.components[n],
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
            acts[n] = _text_activations(cf.shape, int(tokens), batch, cb)
        elif n == "transformer":
            tokens = h * w / facts.pixels_per_token + (g.max_sequence_length if facts.text_tokens else 0)
            rows = batch * (2 if facts.cfg_doubles_batch and g.guidance > 1 else 1)
            per_token = facts.hidden_size * cb
            act = rows * tokens * per_token * (ACT_BASE_TENSORS + ACT_MLP_TENSORS * facts.mlp_ratio)
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
    host = sum(_host_bytes(profile.component(n).offload, weights[n]) for n in present)
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


# ---------------------------------------------------------------------------------- calibration


@dataclass
class Calibration:
    """Corrections learnt from runs.

    Allocated peaks correct the *activations* of the phase that peaked (``measured - weights`` over the
    predicted activations): on the H200 replica every trial whose peak was the VAE decode missed by the
    same 0.6 GB whatever its resident weights (10 GB or 0.2 GB), an additive error in one term that a
    ratio on the whole peak cannot learn. Reserved/NVML peaks (or an allocated peak with negligible
    activations) give a multiplicative correction of the whole peak per offload family. Each correction
    is the median of its pairs (robust to the odd broken run).
    """

    pairs: list[tuple[str, float]] = field(default_factory=list)
    """(offload family, measured / predicted peak)."""
    activation_pairs: list[tuple[str, float]] = field(default_factory=list)
    """(phase, measured / predicted activations of that phase)."""
    min_ratio: float = 0.25
    max_ratio: float = 4.0

    def add(
        self, prediction: Prediction, measured: int | None,
        kind: Literal["allocated", "reserved", "vram"] = "allocated",
    ) -> float | None:
        """Learn from one run.

        Args:
            prediction: the *uncalibrated* prediction of the run's profile.
            measured: the measured peak in bytes (None: nothing is learnt).
            kind: what ``measured`` is: ``allocated`` (torch max_memory_allocated, the best signal),
                ``reserved`` (max_memory_reserved of a capped run) or ``vram`` (max of reserved and NVML).

        Returns:
            The ratio recorded, or None when nothing was learnt.
        """
        if measured is None or measured <= 0:
            return None
        base = prediction.peak_allocated / prediction.calibration_ratio
        act = prediction.breakdown.get(f"activations:{prediction.peak_phase}", 0)
        if kind == "allocated" and base > 0 and act > 0.05 * base:
            resident = base - act
            ratio = min(self.max_ratio, max(self.min_ratio, (measured - resident) / act))
            self.activation_pairs.append((prediction.peak_phase, ratio))
            return ratio
        if kind == "allocated":
            ratio = measured / base if base > 0 else math.nan
        elif kind == "reserved":
            ratio = measured / (prediction.peak_reserved / prediction.calibration_ratio)
        elif kind == "vram":
            predicted = prediction.peak_vram - prediction.overhead
            ratio = (measured - prediction.overhead) / (predicted / prediction.calibration_ratio)
        else:
            raise FluxtuneError(f"calibration kind={kind!r}; use allocated, reserved or vram")
        if not math.isfinite(ratio) or ratio <= 0:
            return None
        ratio = min(self.max_ratio, max(self.min_ratio, ratio))
        self.pairs.append((prediction.family, ratio))
        return ratio

    def ratio(self, family: str) -> float:
        """The correction for an offload family (see :func:`offload_family`)."""
        own = [r for f, r in self.pairs if f == family]
        pool = own or [r for _, r in self.pairs]
        return float(statistics.median(pool)) if pool else 1.0

    def activation_ratio(self, phase: str) -> float:
        """The correction of one phase's activations (1.0 until that phase has peaked in a run)."""
        own = [r for p, r in self.activation_pairs if p == phase]
        return float(statistics.median(own)) if own else 1.0

    def to_dict(self) -> dict[str, Any]:
        return {"pairs": [[f, r] for f, r in self.pairs],
                "activation_pairs": [[p, r] for p, r in self.activation_pairs],
                "min_ratio": self.min_ratio, "max_ratio": self.max_ratio}

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Calibration:
        try:
            return cls(pairs=[(str(f), float(r)) for f, r in data.get("pairs", [])],
                       activation_pairs=[(str(p), float(r)) for p, r in data.get("activation_pairs", [])],
                       min_ratio=float(data.get("min_ratio", 0.25)), max_ratio=float(data.get("max_ratio", 4.0)))
        except (TypeError, ValueError) as e:
            raise FluxtuneError(f"calibration: not a Calibration dump ({e})") from None

    def save(self, path: str | Path) -> None:
        """Write the calibration as JSON."""
        Path(path).write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path: str | Path) -> Calibration:
        """Read a calibration written by :meth:`save`; a missing file is an empty calibration.

        Raises:
            FluxtuneError: the file is not a calibration.
        """
        p = Path(path)
        if not p.exists():
            return cls()
        try:
            data = json.loads(p.read_text())
        except json.JSONDecodeError as e:
            raise FluxtuneError(f"calibration file {str(p)!r} is not JSON ({e}); delete it to start afresh") from None
        return cls.from_dict(data)


# -------------------------------------------------------------------------------------- helpers


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


def check_host_ram(prediction: Prediction, host_ram_budget: int | None) -> str | None:
    """A one-line message when the offload modes need more host memory than allowed, else None."""
    if host_ram_budget is None or prediction.host_ram <= host_ram_budget:
        return None
    return (
        f"the offloaded weights need about {format_bytes(prediction.host_ram)} of host memory (pinned copies for "
        f"streamed offload) but budget.host_ram={format_bytes(host_ram_budget)}: quantize the offloaded "
        f"components, keep more resident, use group offload with disk_path, or raise budget.host_ram"
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
        w = _component_weights(profile.component(n), facts.components[n],
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
