"""modulation.cache: each block's adaLN modulation computed once per timestep, kept in host memory.

Qwen-Image's 60 blocks each turn the timestep embedding into shift, scale and gate vectors through two
Linear layers (``img_mod``, ``txt_mod``: 3072 -> 18432): 6.8 B of its 20.4 B weights, a third of what a
streamed transformer copies every step, for one row of work each. Their output depends on the timestep
embedding alone, and a pipeline calls the transformer with the same timesteps in every generation of the
same step count and size. So those layers leave the transformer (out of reach of quantization and
placement; their weights stay in host memory), and their outputs are kept per timestep embedding in host
memory: for Qwen-Image 4.4 MB a step, copied to the GPU in one piece when the embedding is computed. An
embedding not seen before (the first call, another step count or size) computes every layer's outputs
for all of the scheduler's timesteps at once, each layer's weights copied to the GPU once.

The host copy is in the transformer's dtype, or, where the transformer is quantized, float8 (e4m3) with
a scale per output row: 1 byte a weight (Qwen-Image: 6.8 GB instead of 13.6), finer than the quantization
those layers had on the GPU. Otherwise exact up to the GEMM's rounding.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch

from fluxtune.errors import FluxtuneWarning
from fluxtune.tuning.base import MODULATION, Context, Handler, register
from fluxtune.units import format_bytes

PAIRS = ("img_mod", "txt_mod")
"""The per-block modulation layers (diffusers' QwenImageTransformerBlock): ``Sequential(SiLU, Linear)``."""


def modulation_layers(transformer: Any) -> list[tuple[Any, str]] | str:
    """(block, attribute) of each cacheable modulation layer, or why this transformer has none.

    Cacheable: a ``Sequential(SiLU, Linear)`` fed the output of ``transformer.time_text_embed``, which
    diffusers' Qwen-Image blocks are unless ``zero_cond_t`` (Qwen-Image-Edit-2511) halves it for the text.
    """
    blocks = getattr(transformer, "transformer_blocks", None)
    if blocks is None or not hasattr(transformer, "time_text_embed"):
        return f"{type(transformer).__name__} has no per-block modulation fed by a timestep embedding"
    out: list[tuple[Any, str]] = []
    for block in blocks:
        if getattr(block, "zero_cond_t", False):
            return f"{type(transformer).__name__} with zero_cond_t feeds its text modulation half a batch"
        for attr in PAIRS:
            seq = getattr(block, attr, None)
            if not (isinstance(seq, torch.nn.Sequential) and len(seq) == 2 and isinstance(seq[0], torch.nn.SiLU)
                    and isinstance(seq[1], torch.nn.Linear)):
                return (f"{type(transformer).__name__}'s {type(block).__name__}.{attr} is not SiLU + Linear "
                        "(supported: Qwen-Image's blocks)")
            out.append((block, attr))
    if not out:
        return f"{type(transformer).__name__} has no blocks"
    return out


def _key(t: torch.Tensor) -> tuple[Any, ...]:
    """A timestep embedding's identity: its shape, dtype and bytes (one device->host copy)."""
    data = t.detach().contiguous().view(torch.uint8).cpu().numpy().tobytes()
    return (tuple(t.shape), str(t.dtype), data)


class HostLinear:
    """A Linear layer's weights in host memory: as they are, or float8 with a scale per output row."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None, fp8: bool) -> None:
        # Quantized where the weight is, then moved: a model built on the GPU takes milliseconds per layer
        # there, against seconds for float32 passes over 6.8 B weights on the host.
        w = weight.detach()
        self.dtype, self.out_features = w.dtype, w.shape[0]
        self.bias = None if bias is None else bias.detach().to("cpu")
        self.scale: torch.Tensor | None = None
        if fp8:
            # Out of place: a float32 weight's .float() is the layer's own tensor.
            wf = w.float()
            scale = wf.abs().amax(dim=1).clamp(min=1e-12) / torch.finfo(torch.float8_e4m3fn).max
            w = (wf / scale[:, None]).to(torch.float8_e4m3fn)
            self.scale = scale.to("cpu")
        self.weight = w.to("cpu")

    @property
    def nbytes(self) -> int:
        extra = 0 if self.scale is None else self.scale.numel() * 4
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.weight.numel() * self.weight.element_size() + extra + bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        """``linear(silu(x))`` on x's device, the weights copied there for the call."""
        dev = x.device
        w = self.weight.to(dev, non_blocking=True)
        if self.scale is not None:
            w = w.to(self.dtype) * self.scale.to(dev, self.dtype)[:, None]
        bias = None if self.bias is None else self.bias.to(dev, non_blocking=True)
        return torch.nn.functional.linear(torch.nn.functional.silu(x).to(self.dtype), w, bias)


class ModulationCache:
    """The modulation layers taken out of the transformer, and their outputs per timestep embedding."""

    def __init__(self, layers: list[HostLinear], device: torch.device, scheduler: Any) -> None:
        self.layers, self.device, self.scheduler = layers, device, scheduler
        self.table: dict[tuple[Any, ...], torch.Tensor] = {}
        self.current: torch.Tensor | None = None
        """This step's outputs on the device, [layers, batch, features]."""
        self.temb: torch.Tensor | None = None
        self.misses = self.filled = self.fallbacks = 0
        self._args: tuple[Any, ...] = ()
        self._kwargs: dict[str, Any] = {}
        self._filling = False

    # -- hooks on transformer.time_text_embed --------------------------------------------------------
    def pre_hook(self, module: Any, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
        if not self._filling:
            self._args, self._kwargs = args, kwargs

    def hook(self, module: Any, args: Any, kwargs: Any, temb: torch.Tensor) -> None:
        if self._filling:
            return
        key = _key(temb)
        if key not in self.table:
            self.misses += 1
            self._fill(module, temb, key)
        self.current = self.table[key].to(self.device, non_blocking=True)
        self.temb = temb

    # -- filling -------------------------------------------------------------------------------------
    def _schedule_embeddings(self, module: Any, temb: torch.Tensor) -> list[torch.Tensor]:
        """The embeddings of the scheduler's other timesteps, through the same embedder and arguments.

        Qwen-Image's pipeline passes ``t.expand(batch).to(latents.dtype) / 1000``: the candidates are made
        the same way, so that their embeddings are bit for bit the ones the pipeline will ask for. Where the
        captured timestep is none of them, only the current embedding is computed."""
        ts = getattr(self.scheduler, "timesteps", None)
        current = self._args[0] if self._args else None
        if ts is None or not torch.is_tensor(current) or current.dim() != 1:
            return []
        cands = ts.flatten().to(current.device, torch.float32)[:, None].expand(-1, current.shape[0])
        cands = cands.to(current.dtype) / 1000
        same = (cands == current[None]).all(dim=1).tolist()
        if not any(same):
            return []
        out = []
        self._filling = True
        try:
            with torch.no_grad():
                for row, hit in zip(cands, same, strict=True):
                    if not hit:
                        out.append(module(row.clone(), *self._args[1:], **self._kwargs))
        finally:
            self._filling = False
        return [e for e in out if e.shape == temb.shape and e.dtype == temb.dtype]

    @torch.no_grad()
    def _fill(self, module: Any, temb: torch.Tensor, key: tuple[Any, ...]) -> None:
        rows = [temb, *self._schedule_embeddings(module, temb)]
        x = torch.cat(rows)
        n, b = len(rows), temb.shape[0]
        first = self.layers[0]
        pin = self.device.type == "cuda"
        host = torch.empty((n, len(self.layers), b, first.out_features), dtype=first.dtype, pin_memory=pin)
        for j, layer in enumerate(self.layers):
            host[:, j] = layer(x).view(n, b, -1).to("cpu")
        keys = [key] + [_key(e) for e in rows[1:]]
        for i, k in enumerate(keys):
            self.table.setdefault(k, host[i])
        self.filled += n


class CachedModulation(torch.nn.Module):
    """Stands where a block's modulation layer was: returns its output for this step's embedding."""

    def __init__(self, cache: ModulationCache, index: int) -> None:
        super().__init__()
        self.index = index
        # A plain attribute, not a submodule: the weights stay out of quantization, placement and the
        # streamer's block sizes.
        self.__dict__["_cache"] = cache

    @torch.compiler.disable
    def forward(self, temb: torch.Tensor) -> torch.Tensor:
        cache = self.__dict__["_cache"]
        cur = cache.current
        if cur is None or cache.temb is None or temb.data_ptr() != cache.temb.data_ptr() or \
                temb.shape != cache.temb.shape:
            # Fed something other than this step's embedding (a pipeline this was not built for):
            # compute it here, with the layer's weights copied over, and say so once: every step then
            # copies the layer's weights, slower than keeping them on the GPU.
            if cache.fallbacks == 0:
                warnings.warn("modulation.cache: a block was fed an embedding other than this step's timestep "
                              "embedding; its modulation is computed from the host copy at every call (slow). "
                              "Drop modulation.cache for this pipeline", FluxtuneWarning, stacklevel=2)
            cache.fallbacks += 1
            return cache.layers[self.index](temb)
        return cur[self.index]


def _weights(transformer: Any, name: str, lin: torch.nn.Linear,
             device: torch.device) -> tuple[torch.Tensor, torch.Tensor | None]:
    """A modulation layer's weight and bias; read from the checkpoint where ``fluxtune.load`` left them on the
    meta device (placement, which reads the rest, never sees these layers), onto ``device`` if it is a GPU."""
    from fluxtune.loading.checkpoint import read_tensor
    from fluxtune.tuning.state import weight_plan

    if not lin.weight.is_meta:
        return lin.weight, lin.bias
    plan = weight_plan(transformer)
    assert plan is not None and plan.source is not None, "a meta transformer without a checkpoint to read"
    dev = device if device.type == "cuda" else torch.device("cpu")
    weight = read_tensor(plan.source, f"{name}.weight", dev).to(lin.weight.dtype)
    bias = None if lin.bias is None else read_tensor(plan.source, f"{name}.bias", dev).to(lin.bias.dtype)
    return weight, bias


@register
class ModulationHandler(Handler):
    name = "modulation"
    phase = MODULATION
    reversible = False

    def check(self, ctx: Context) -> list[str]:
        if not ctx.profile.modulation.cache:
            return []
        t = getattr(ctx.pipe, "transformer", None)
        if getattr(t, "_fluxtune_modulation_cache", None) is not None:
            return []  # applied by an earlier profile (irreversible: the signatures must agree)
        found = modulation_layers(t) if t is not None else "the pipeline has no transformer"
        if isinstance(found, str):
            return [f"modulation.cache=true: {found}; drop it for this pipeline"]
        if ctx.profile.loras:
            return ["modulation.cache=true with loras: a LoRA on the modulation layers would be ignored; "
                    "drop one of them"]
        return []

    def apply(self, ctx: Context) -> None:
        if not ctx.profile.modulation.cache:
            return
        t = ctx.pipe.transformer
        found = modulation_layers(t)
        assert not isinstance(found, str)
        fp8 = ctx.profile.transformer.quantize is not None
        originals = [getattr(block, attr) for block, attr in found]
        names = {id(m): n for n, m in t.named_modules()}
        layers = [HostLinear(*_weights(t, names[id(seq[1])], seq[1], ctx.device), fp8) for seq in originals]
        params = sum(p.numel() for seq in originals for p in seq.parameters())
        cache = ModulationCache(layers, ctx.device, getattr(ctx.pipe, "scheduler", None))
        for i, (block, attr) in enumerate(found):
            setattr(block, attr, CachedModulation(cache, i))
        del originals  # their device copies go with them
        emb = t.time_text_embed
        emb.register_forward_pre_hook(cache.pre_hook, with_kwargs=True)
        emb.register_forward_hook(cache.hook, with_kwargs=True)
        t._fluxtune_modulation_cache = cache
        nbytes = sum(layer.nbytes for layer in layers)
        per_step = len(layers) * layers[0].out_features * torch.empty((), dtype=layers[0].dtype).element_size()
        kind = "float8 with row scales" if fp8 else str(layers[0].dtype).replace("torch.", "")
        ctx.report.add(self.name, "transformer",
                       f"{len(layers)} modulation layers ({params:,} weights) moved to host memory "
                       f"({format_bytes(nbytes)}, {kind}); their outputs cached per timestep "
                       f"({format_bytes(per_step)} a step and image), computed for the whole schedule at its "
                       "first step")
