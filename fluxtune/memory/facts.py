"""Facts about a loaded pipeline, read from its torch modules once: parameter counts per component,
layer and block, and the shapes that size activations. The only part of the memory model that touches torch."""

from __future__ import annotations

import functools
import re
from dataclasses import asdict, dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from fluxtune.errors import FluxtuneError, PipelineError
from fluxtune.profile import COMPONENTS

if TYPE_CHECKING:
    import torch


QKV_RE = re.compile(r"(^|\.)(to_q|to_k|to_v|add_q_proj|add_k_proj|add_v_proj)$")
"""The attention projections ``fuse_qkv`` fuses (the fused copy comes on top of them)."""




MODULATION_RE = r"\.(img_mod|txt_mod)\.1$"
"""The leaves ``modulation.cache`` takes out of the transformer (fluxtune.tuning.modcache.PAIRS)."""


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
    output_embedding: str | None = None
    """A text encoder's language-model head (``get_output_embeddings()``), when it is a Linear of its
    own: kept in the load dtype (see :func:`fluxtune.tuning.quantize.output_embedding`)."""

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
        return sum(leaf.params for leaf in self.leaves if QKV_RE.search(leaf.name))

    def without_modulation(self) -> tuple[ComponentFacts, int]:
        """These facts with the per-block modulation layers taken out (``modulation.cache``), and the
        parameters taken out (they stay in host memory in the component's dtype)."""
        import dataclasses

        rx = re.compile(MODULATION_RE)
        gone = [leaf for leaf in self.leaves if rx.search(leaf.name)]
        if not gone:
            return self, 0

        def trim(rows: dict[str, tuple[int, ...]]) -> dict[str, tuple[int, ...]]:
            out = {k: list(v) for k, v in rows.items()}
            for leaf in gone:
                for k, sizes in out.items():
                    m = re.match(re.escape(k) + r"\.(\d+)\.", leaf.name)
                    if m and int(m.group(1)) < len(sizes):
                        sizes[int(m.group(1))] -= leaf.params
            return {k: tuple(v) for k, v in out.items()}

        removed = sum(leaf.params for leaf in gone)
        kept = tuple(leaf for leaf in self.leaves if not rx.search(leaf.name))
        stream = None if self.stream_blocks is None else trim(self.stream_blocks)
        return dataclasses.replace(self, params=self.params - removed, leaves=kept, blocks=trim(self.blocks),
                                   stream_blocks=stream), removed

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
            # FLUX.1 and Qwen-Image pack 2x2 latent pixels into one token in the pipeline, FLUX.2 in its
            # VAE (whose latents then have half the side): 16x16 pixels per token in all three (Qwen-Image's
            # transformer config says patch_size=2 for that packing, which must not count twice).
            sample = int(getattr(pipe, "default_sample_size", 128))
            height = width = sample * int(getattr(pipe, "vae_scale_factor", vae_scale))
            ppt = (vae_scale * 2 * (patch if fam == "flux" else 1)) ** 2
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
    from fluxtune.diskcache import remembered
    from fluxtune.pipelines import BUILTINS

    if name in BUILTINS and BUILTINS[name].needs_gpu:  # the replicas: seconds to build, remembered on disk
        # ".v2": facts gained output_embedding; facts stored by an older fluxtune lack it.
        return remembered("facts", f"{name}.v2", lambda: _count_facts(name), ModelFacts.to_dict, ModelFacts.from_dict)
    return _count_facts(name)


def _count_facts(name: str) -> ModelFacts:
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
    from fluxtune.tuning.layerwise import default_skip

    try:
        from diffusers.hooks.layerwise_casting import DEFAULT_SKIP_MODULES_PATTERN
        from diffusers.models.modeling_utils import ModelMixin
    except ImportError:  # pragma: no cover - diffusers is a core dependency
        lc_default, is_diffusers = ("pos_embed", "patch_embed", "norm", "^proj_in$", "^proj_out$"), False
    else:
        is_diffusers = isinstance(module, ModelMixin)
        # What LayerwiseCastingHandler skips: another model (a transformers encoder) keeps more (default_skip).
        lc_default = tuple(DEFAULT_SKIP_MODULES_PATTERN) if is_diffusers else default_skip(module)
    if is_diffusers:
        # enable_layerwise_casting adds these even to user-given patterns (diffusers-knobs.md §2.2).
        lc_class = tuple(getattr(module, "_keep_in_fp32_modules", None) or ()) + tuple(
            getattr(module, "_skip_layerwise_casting_patterns", None) or ()
        )
    from fluxtune.tuning.quantize import output_embedding
    from fluxtune.tuning.streaming import repeated_blocks

    streamed: dict[str, list[int]] = {}
    for block_name, b in repeated_blocks(module):
        streamed.setdefault(block_name.rsplit(".", 1)[0], []).append(sum(p.numel() for p in b.parameters()))
    stream_blocks = {k: tuple(v) for k, v in streamed.items()}
    return ComponentFacts(
        name=name, class_name=type(module).__name__, params=n_params, dtype_bytes=dtype_bytes,
        buffer_bytes=buffer_bytes, leaves=tuple(leaves), blocks=blocks, lc_default_skip=lc_default,
        lc_class_skip=lc_class, shape=_shape_facts(name, module), output_embedding=output_embedding(module),
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
        text = get("text_config")  # Qwen2.5-VL / Mistral3: the language model's sizes sit in text_config
        if text is not None:
            cfg = text
        hidden = int(get("d_model", "hidden_size", default=768))
        clip = str(get("model_type", default="")).startswith("clip")
        return {
            "hidden": hidden,
            "ffn": int(get("d_ff", "intermediate_size", default=4 * hidden)),
            "heads": int(get("num_heads", "num_attention_heads", default=12)),
            # CLIP always pads to its 77 positions; T5 and the LLM encoders (Qwen3, Qwen2.5-VL: 40960 and
            # 128000 positions) run the call's max_sequence_length (None here).
            "max_tokens": int(get("max_position_embeddings", default=77)) if clip else None,
        }
    return {}
