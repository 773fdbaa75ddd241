"""Predicted latency of a profile on a named GPU, from the work counted in the model's module shapes.

Nothing here is measured on the card it predicts for: every output says "predicted". The model is

- **work**, counted once per (model, size, batch) by running one forward of each component on the
  meta device under a dispatch mode (:func:`count_work`): GEMM FLOPs (mm/addmm/bmm/convolution),
  attention FLOPs (``scaled_dot_product_attention``, intercepted before it decomposes), the bytes read
  and written by every other op (norms, RoPE, activations, modulation: the memory-bound work), and the
  number of kernels an eager forward launches. FLUX.1-dev at 1024x1024 with 512 T5 tokens counts
  74.4 TFLOP per step (59.5 in GEMMs, 14.9 in attention), against cache-dit's 74.5 (3726.87 / 50) and
  diffusers CI's 59.5 for the linears. Meta execution needed one workaround: ``scaled_dot_product_attention``
  decomposes into bmm + softmax on meta tensors, so a TorchFunctionMode intercepts it, counts
  ``2 x Lq x Lk x (d + dv)`` per head and returns an empty tensor of the output's shape.
- **time** per phase (:func:`predict_latency`): GEMMs at the card's dense rate for the precision the
  profile computes in, attention at bf16, each divided by an efficiency; the other bytes over the
  memory bandwidth (fewer when compiled); the GPU time is floored by the CPU's launch time
  (``max(gpu, kernels x launch)``); host->device transfers of streamed weights overlap with compute
  as fluxtune's streamer overlaps them (``max(compute, transfer) + penalty x min(...)``).
- :func:`compute_floor`: FLOPs at the card's fastest rate at 100 % efficiency.

Not modelled: step caches (first_block, taylorseer, magcache), VAE tiling's overlap, host RAM and
pinning limits, Windows/WDDM, thermal clocks, and the per-call first-run compile time.

**Calibration** (``scripts/predict_fit.py``; every constant below says what it was fitted on). The
fits use the H200 runs of the FLUX.1-dev replica at 1024x1024 / 28 steps in
``shared/reference/h200-measurements.md``, the README bench (2026-11-21 .. 2026-12-01) and its kernel
profile, plus one DiT-XL/2 int8 run: the ten FLUX runs are reproduced within 0-4 %, the held-out
DiT-XL/2 bf16 run (3.52 s) is predicted at 2.96 s (-16 %). One constant is not from the H200:
``non_hopper_scale`` (1.61), fitted on a single published L20 figure, because the H200-only model
over-predicts every non-Hopper card by 1.3-1.9x (the H200 reaches 43 % of its bf16 peak in eager
FLUX; the L20 and L40 reach 75-80 % of theirs). The other published figures are the check
(``scripts/predict_check.py``): 13 of 22 within 25 % (9 of 22 without the factor).
"""

from __future__ import annotations

import functools
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field, replace
from typing import TYPE_CHECKING, Any

from fluxtune.errors import PipelineError, ProfileError
from fluxtune.knobs import MagCache, TaylorSeerCache

if TYPE_CHECKING:
    from fluxtune.gpus import GpuSpec
    from fluxtune.knobs import Generation
    from fluxtune.memory import ModelFacts
    from fluxtune.profile import Profile

__all__ = [
    "CONSTANTS",
    "ComponentWork",
    "LatencyPrediction",
    "PhaseTime",
    "Work",
    "compute_floor",
    "compute_precision",
    "count_work",
    "emulated_on",
    "predict_latency",
]

# -------------------------------------------------------------------------------------- constants
# One dict so that scripts/predict_fit.py can refit them; the values are the fit's output.

CONSTANTS: dict[str, float] = {
    # GEMM efficiency (achieved / dense peak) per compute precision.
    # bf16: fitted (with bw_eff and compiled_traffic) on three H200 runs at 1024x1024 / 28 steps: eager
    #   bf16 5.00 s, fused QKV + regional compile bf16 3.83 s, flux-dev-fast (fp8 rowwise + fused QKV +
    #   regional compile) 2.94 s: three equations, three unknowns. Out: 0.70 (692 TFLOPS of 989).
    "gemm_eff_bf16": 0.70,
    # fp8: from the kernel profile of flux-dev-fast (docs/results/2026-12-01/speed-probe-2.jsonl): the fp8
    #   GEMMs of a step take ~48 ms (nvjet fp8 kernels) for 59.5 TFLOP = 1240 TFLOPS = 0.62 of 1979.
    "gemm_eff_fp8": 0.62,
    # int8 (torchao W8A8 dynamic, compiled): at a FLUX / Qwen-Image block's shapes (3072 wide, 4096 rows;
    #   scripts/quant_kernels.py on the H200, docs/results/2026-12-04/session15/kernels.jsonl) it took 1.457 ms
    #   where fp8_dynamic took 0.887 ms. Both quantize activations alike, so with fp8's GEMMs at 0.62 (0.567 ms)
    #   the shared rest is 0.320 ms and int8's GEMMs 1.137 ms: 0.31 of 1979 TOPS (scripts/predict_fit.py,
    #   stage 6). DiT-XL/2-256's narrower GEMMs (1152) do worse: its int8 run (5.33 s) is predicted at 3.61 s
    #   (-32 %; the fit until 2026-12-04 used it, 0.18). Ampere's and Ada's int8 tensor cores are not measured:
    #   the same value, with the non-Hopper scale, is used.
    "gemm_eff_int8": 0.31,
    # float16 with float16 accumulate (matmul.fp16_accumulation), relative to bf16's efficiency: on an RTX 4090,
    #   a (2x4096, 4096) x (4096, 4096) GEMM ran at 305.8 TFLOP/s with half accumulate (cuBLASLt) against
    #   167.0 for torch's float32-accumulate matmul (aredden/torch-cublas-hgemm, README): 0.926 of 330.3
    #   against 1.011 of 165.2, a ratio of 0.916. Published, one card, one shape; the H200 cannot measure it.
    "fp16acc_vs_bf16": 0.916,
    # Attention at bf16: cuDNN SDPA at FLUX's shape (4608 tokens, 24 heads x 128) took 0.42-0.45 ms per
    #   call (scripts/attention_check.py; 24 ms per step for 57 calls in the kernel profile above):
    #   0.261 TFLOP / 0.42 ms = 620 TFLOPS = 0.63 of 989.
    "attn_eff": 0.63,
    # Memory-bound ops: fraction of the card's bandwidth they reach. Fitted with gemm_eff_bf16: 0.69
    #   (212 GB of eager non-GEMM traffic per FLUX step -> 64 ms on the H200).
    "bw_eff": 0.69,
    # Bytes a compiled transformer moves in its non-GEMM ops, relative to eager. Fitted with
    #   gemm_eff_bf16: 0.35 (Inductor fuses norms, RoPE, modulation and activations).
    "compiled_traffic": 0.35,
    # Extra bytes per weight parameter per forward for weight-only quantization in eager mode
    #   (dequantizing to bf16 before the matmul): fitted on torchao Int8WeightOnly eager, 6.64 s vs
    #   5.00 s bf16 (11.9 G params): 16.3. Compiled: assumed a quarter (Inductor fuses the dequant; unfitted).
    "weight_only_bytes_per_param": 16.3,
    # NF4 (bitsandbytes): bytes moved per weight parameter per forward to dequantize it to bf16 before the
    #   GEMM, eager or compiled (bitsandbytes' kernels are opaque to Inductor). Measured with
    #   scripts/quant_kernels.py on the H200 (docs/results/2026-12-04/session15/kernels.jsonl): three Linear
    #   layers of a 3072-wide block (84.9 M params) at 4096 rows took 1.166 ms against bf16's 0.905 ms;
    #   0.261 ms at the H200's modelled bandwidth (4.8 TB/s x bw_eff) is 10.2 bytes per parameter.
    "nf4_bytes_per_param": 10.2,
    # torchao int4 weight-only (tinygemm, tile-packed): its GEMMs run at this fraction of the card's dense
    #   bf16 rate. Same kernel bench: 24.4 ms at 4096 rows against bf16's 0.905 ms, 28.5 TFLOP/s = 0.029 of
    #   989 (compiled: 24.37 ms, the same kernel). tinygemm is made for a few rows (LLM decoding: at 64 rows
    #   it reads its 4-bit weights 5x slower than bf16 reads its own); a DiT's thousands of image tokens
    #   make it the slowest method fluxtune has. Measured on the H200 only: other cards get the non-Hopper
    #   scale like every efficiency.
    "gemm_eff_int4_weight": 0.029,
    # A step a MagCache skips, relative to a computed one: the time/text embedders, the last norm and
    #   projection and the residual add run; the blocks do not (FLUX.1-dev: under 1 % of a step's FLOPs; the
    #   rest is launches). Assumed, not fitted: no cached run is in the fit (replicas' caches mean nothing).
    "cache_skipped_step": 0.02,
    # Dynamic activation quantization (fp8_dynamic / int8_dynamic): bytes per GEMM input element to
    #   compute the scale and write the quantized copy (read 2 + amax pass 2 + write 1; halved when
    #   compiled). Not fitted separately: the fp8 fit above was made with it in place.
    "dynamic_quant_bytes_per_input": 5.0,
    # CPU time per kernel an eager forward launches (t = max(gpu, kernels x launch_s)): fitted on eager
    #   bf16 at 512x512, 1.67 s: its GPU terms are a third of 1024x1024's yet it takes 0.33 of the time,
    #   so its 0.057 s/step is the CPU's (3,794 kernels per step): 15 us. Eager 1024x1024 stays GPU-bound.
    "launch_s": 15.1e-6,
    # Kernels a compiled transformer launches per GEMM/attention call (Inductor fuses the pointwise work
    #   between them): 2, assumed (unidentifiable here: no compiled H200 run was CPU-bound).
    "compiled_kernels_per_gemm": 2.0,
    # Convolutions (the VAE decoder's, eager cuDNN, bf16): fitted on the decode phase of flux-dev-fast,
    #   0.088 s at 1024x1024 (speed-probe-2.jsonl; 9.9 TFLOP of convolutions): 0.125.
    "conv_eff": 0.125,
    # Per call, outside the modelled kernels (tokenizers, prompt preparation): fitted on the text-encoding
    #   phase of flux-dev-fast, 0.044 s (CLIP + T5 resident, bf16), given the kernels' own time: 0.027 s.
    "call_overhead_s": 0.027,
    # Host->device for partial residency (fluxtune's streamer): fraction of the card's h2d_gbs reached,
    #   and the share of the shorter of (compute, transfer) not hidden. Grid-fitted on the 12 GB (3.46 s)
    #   and 8 GB (4.52 s) presets as measured on the H200 (fp8 row-wise, 7.7 / 4.5 GB resident, so 4.2 /
    #   7.5 GB streamed per step at 52 GB/s), the rate capped at the measured link: 1.00 and 0.14 (errors
    #   -3.5 % / +2.6 %; those presets' runs spread over 3.25-4.21 s and 4.5-5.0 s). Why max + a small
    #   part: the streamer copies block i+1 on a side stream while block i computes, so a step takes the
    #   longer of the two; not hidden are the first streamed block's copy, the per-block stream waits and
    #   the copy engine's contention for HBM with the kernels.
    "h2d_eff_partial": 1.0,
    "overlap_penalty": 0.14,
    # diffusers group offload (leaf level, streams): many small copies. Fitted on the bf16 leaf-level
    #   recipe under 12 GB, 15.29 s (README bench; 14.2 s in h200-measurements.md): 0.90.
    "h2d_eff_group": 0.90,
    # Cards outside the Hopper class (Ada, Ampere, Blackwell) reach a larger fraction of their spec than
    #   the H200 does: GEMM/attention/convolution efficiencies are multiplied by this (capped at 1.0) and
    #   the memory-bound ops' bandwidth fraction too (uncapped: Ada's 72-96 MB L2 holds the 28-113 MB
    #   activations that FLUX's chains of pointwise ops re-read; the H200 has 50 MB). NOT from the H200:
    #   fitted on ONE published figure, cache-dit's L20 bf16 eager 28 steps (23.4-24.85 s): 1.61, and
    #   checked on the other non-Hopper figures (scripts/predict_check.py, held out: L20 compile -3 %,
    #   L20 fp8 + compile +2 %, L20 model offload +11 %, L40 eager forward +22 %, A40 -13 %, RTX 3060 -8 %,
    #   L40S -20 %; misses: L40 compiled forward +28 %, informal RTX 4090 ComfyUI -34 %). With 1.0 (the
    #   H200-only model) those cards are over-predicted by 1.3-1.9x. Blackwell has no usable figure: the
    #   factor is assumed there.
    "non_hopper_scale": 1.61,
    # enable_model_cpu_offload: pageable copies there and back, not overlapped. Fitted on 23.3 s vs
    #   5.00 s resident (34 GB moved per call): 0.035 of the H200's 52 GB/s (1.8 GB/s).
    "h2d_eff_model": 0.035,
    # enable_sequential_cpu_offload: every leaf, synchronously, every step. Fitted on 123 s under 8 GB: 0.11.
    "h2d_eff_sequential": 0.11,
}

_FP8_CLASSES = ("ada", "hopper", "blackwell")
_MEMORY_BOUND_ROWS = 256
"""GEMMs with fewer rows than this (modulation, timestep embedders, pooled projections) are bound by
reading their weights: their operand bytes go to the memory term, not the FLOP term."""

_VIEW_OPS = frozenset({
    "view", "_unsafe_view", "reshape", "unsqueeze", "squeeze", "t", "transpose", "permute", "expand",
    "slice", "select", "split", "split_with_sizes", "unbind", "alias", "as_strided", "detach", "narrow",
    "chunk", "unflatten", "flatten", "view_as_real", "view_as_complex", "empty", "empty_like",
    "empty_strided", "lift_fresh", "_reshape_alias", "diagonal", "movedim", "lift_fresh_copy",
    "unfold", "_local_scalar_dense", "is_same_size", "sym_size", "sym_stride", "sym_numel",
})
_GEMM_OPS = frozenset({"mm", "addmm", "bmm", "baddbmm", "convolution", "_convolution", "matmul", "linear"})

# ------------------------------------------------------------------------------------------ work


@dataclass(frozen=True)
class ComponentWork:
    """What one forward of a component does (the transformer: one denoising step).

    ``other_bytes`` are bytes read + written by the ops that are neither GEMMs nor attention, as eager
    PyTorch runs them, plus the operand bytes of GEMMs too thin to be compute-bound (weight-read bound).
    ``gemm_input_elems`` counts the activation elements fed to the compute-bound GEMMs (what dynamic
    quantization has to quantize); ``weight_params`` the parameters of the component.
    """

    name: str
    gemm_flops: float
    attn_flops: float
    other_bytes: float
    kernels: int
    gemm_calls: int
    attn_calls: int
    gemm_input_elems: float = 0.0
    weight_params: float = 0.0
    conv_flops: float = 0.0
    """The part of ``gemm_flops`` done by convolutions (the VAE's), which run far below GEMM efficiency."""
    extrapolated: dict[str, float] = field(default_factory=dict)
    """The share of the counts above done inside the modules TaylorSeer extrapolates on its predicted steps
    (the blocks' attention modules: projections and attention), plus their output elements (``out_elems``)."""

    @property
    def flops(self) -> float:
        return self.gemm_flops + self.attn_flops

    def without_extrapolated(self, extra_bytes: float) -> ComponentWork:
        """This work with TaylorSeer's extrapolated modules replaced by ``extra_bytes`` of elementwise work."""
        x = self.extrapolated
        if not x:
            return self
        return replace(self, gemm_flops=self.gemm_flops - x["gemm_flops"], attn_flops=self.attn_flops - x["attn_flops"],
                       other_bytes=self.other_bytes - x["other_bytes"] + extra_bytes,
                       kernels=int(self.kernels - x["kernels"]), gemm_calls=int(self.gemm_calls - x["gemm_calls"]),
                       attn_calls=int(self.attn_calls - x["attn_calls"]),
                       gemm_input_elems=self.gemm_input_elems - x["gemm_input_elems"])


@dataclass(frozen=True)
class Work:
    """Counted work of one generation's phases; ``components["transformer"]`` is per denoising step."""

    model: str
    family: str
    height: int
    width: int
    batch: int
    max_sequence_length: int
    rows: int
    """Transformer batch rows (DiT with classifier-free guidance runs 2 per image)."""
    components: dict[str, ComponentWork] = field(default_factory=dict)
    notes: tuple[str, ...] = ()
    pipeline: str = ""
    """The diffusers pipeline class (its ``__call__`` decides true CFG)."""

    def step(self) -> ComponentWork:
        """The transformer's work for one denoising step."""
        return self.components["transformer"]


class _Counter:
    """Accumulates one component's counts."""

    def __init__(self) -> None:
        self.gemm_flops = 0.0
        self.attn_flops = 0.0
        self.other_bytes = 0.0
        self.kernels = 0
        self.gemm_calls = 0
        self.attn_calls = 0
        self.gemm_input_elems = 0.0
        self.conv_flops = 0.0


def _elems(t: Any) -> int:
    """Distinct elements a tensor touches: broadcast (stride-0) dimensions count once."""
    n = 1
    for size, stride in zip(t.shape, t.stride(), strict=False):
        if stride != 0:
            n *= int(size)
    return n


def _tensors(obj: Any) -> list[Any]:
    import torch

    out: list[Any] = []
    if isinstance(obj, torch.Tensor):
        out.append(obj)
    elif isinstance(obj, list | tuple):
        for o in obj:
            out.extend(_tensors(o))
    elif isinstance(obj, dict):
        for o in obj.values():
            out.extend(_tensors(o))
    return out


def _gemm_flops(name: str, args: tuple[Any, ...], out: Any) -> tuple[float, int, float]:
    """(FLOPs, rows of the left operand, bytes of the operands and output) of a GEMM-class op."""
    import torch

    tensors = [t for t in args if isinstance(t, torch.Tensor)]
    nbytes = float(sum(_elems(t) * t.element_size() for t in tensors)) + out.numel() * out.element_size()
    if name in ("convolution", "_convolution"):
        x, w = args[0], args[1]
        groups = int(args[8]) if len(args) > 8 else 1
        k = int(w.shape[1]) * math.prod(int(s) for s in w.shape[2:])
        del groups  # w.shape[1] is already in_channels / groups
        return 2.0 * out.numel() * k, int(x.shape[0]), nbytes
    if name in ("addmm", "baddbmm"):
        a, b = args[1], args[2]
    else:
        a, b = args[0], args[1]
    k = int(a.shape[-1])
    rows = int(math.prod(int(s) for s in a.shape[:-1]))
    if name in ("bmm", "baddbmm"):
        rows = int(a.shape[-2])
    del b
    return 2.0 * out.numel() * k, rows, nbytes


_COUNTED = ("gemm_flops", "attn_flops", "other_bytes", "kernels", "gemm_calls", "attn_calls", "gemm_input_elems")


def _taylorseer_modules(module: Any) -> list[Any]:
    """The modules diffusers' TaylorSeer extrapolates by default (the blocks' attention modules)."""
    import re

    try:
        from diffusers.hooks.taylorseer_cache import _TRANSFORMER_BLOCK_IDENTIFIERS as patterns
    except ImportError:  # pragma: no cover - a diffusers without TaylorSeer
        return []
    return [m for name, m in module.named_modules() if any(re.fullmatch(p, name) for p in patterns)]


def _count_forward(fn: Any, tracked: Sequence[Any] = ()) -> tuple[_Counter, dict[str, float]]:
    """Run ``fn()`` under the counting modes; returns the counts and the part of them done inside the
    ``tracked`` modules (with ``out_elems``, their outputs' elements)."""
    import torch
    import torch.nn.functional as F
    from torch.overrides import TorchFunctionMode
    from torch.utils._python_dispatch import TorchDispatchMode

    c = _Counter()
    inside: dict[str, float] = dict.fromkeys((*_COUNTED, "out_elems"), 0.0)
    marks: list[dict[str, float]] = []

    def enter(module: Any, args: Any) -> None:
        marks.append({k: float(getattr(c, k)) for k in _COUNTED})

    def leave(module: Any, args: Any, output: Any) -> None:
        start = marks.pop()
        for k in _COUNTED:
            inside[k] += float(getattr(c, k)) - start[k]
        inside["out_elems"] += float(sum(t.numel() for t in _tensors(output)))

    handles = [h for m in tracked for h in (m.register_forward_pre_hook(enter), m.register_forward_hook(leave))]

    class Attention(TorchFunctionMode):
        # SDPA decomposes into bmm + softmax on the meta device (the math path); intercept it first so
        # attention is counted as attention and its result is a shape-only placeholder.
        def __torch_function__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            if func is F.scaled_dot_product_attention:
                q = args[0] if len(args) > 0 else kwargs["query"]
                k = args[1] if len(args) > 1 else kwargs["key"]
                v = args[2] if len(args) > 2 else kwargs["value"]
                lq, lk, d, dv = int(q.shape[-2]), int(k.shape[-2]), int(q.shape[-1]), int(v.shape[-1])
                lead = math.prod(int(s) for s in q.shape[:-2])
                c.attn_flops += 2.0 * lead * lq * lk * (d + dv)
                c.attn_calls += 1
                c.kernels += 1
                return torch.empty(*q.shape[:-1], dv, dtype=q.dtype, device=q.device)
            return func(*args, **kwargs)

    class Ops(TorchDispatchMode):
        def __torch_dispatch__(self, func: Any, types: Any, args: tuple[Any, ...] = (), kwargs: Any = None) -> Any:
            kwargs = kwargs or {}
            name = func.overloadpacket.__name__
            if name == "_local_scalar_dense" and args[0].is_meta:
                # A value read on meta (transformers' "is the mask all ones?", "are the sequences packed?"):
                # answer as for one unpadded, unpacked sequence; it steers control flow, not shapes.
                return True if args[0].dtype == torch.bool else 0
            out = func(*args, **kwargs)
            if name in _VIEW_OPS:
                return out
            c.kernels += 1
            if name in _GEMM_OPS and isinstance(out, torch.Tensor):
                flops, rows, nbytes = _gemm_flops(name, args, out)
                c.gemm_flops += flops
                c.gemm_calls += 1
                if name in ("convolution", "_convolution"):
                    c.conv_flops += flops
                if rows < _MEMORY_BOUND_ROWS and name not in ("convolution", "_convolution"):
                    c.other_bytes += nbytes
                else:
                    a = args[1] if name in ("addmm", "baddbmm") else args[0]
                    c.gemm_input_elems += _elems(a)
                return out
            nbytes = 0
            for t in _tensors(args) + _tensors(kwargs) + _tensors(out):
                nbytes += _elems(t) * t.element_size()
            c.other_bytes += nbytes
            return out

    try:
        with torch.no_grad(), Attention(), Ops():
            fn()
    finally:
        for h in handles:
            h.remove()
    return c, (inside if tracked else {})


def _forwards(pipe: Any, family: str, height: int, width: int, batch: int, msl: int, rows: int,
              device: Any) -> dict[str, Any]:
    """A zero-argument forward for each component at the call's shapes."""
    import torch

    dtype = next(pipe.transformer.parameters()).dtype
    out: dict[str, Any] = {}
    vae = pipe.vae
    # Qwen-Image's video VAE has no block_out_channels / latent_channels: its pipeline knows its scale.
    scale = int(getattr(pipe, "vae_scale_factor", 0) or 2 ** (len(vae.config.block_out_channels) - 1))
    lat_c = int(getattr(vae.config, "latent_channels", None) or vae.config.z_dim)
    lh, lw = height // scale, width // scale

    def tensor(*shape: int, dt: Any = dtype) -> Any:
        return torch.zeros(*shape, dtype=dt, device=device)

    if family == "flux":
        te, te2, tr = pipe.text_encoder, pipe.text_encoder_2, pipe.transformer
        clip_len = int(getattr(te.config, "max_position_embeddings", 77))
        ids = torch.zeros(batch, clip_len, dtype=torch.long, device=device)
        out["text_encoder"] = lambda: te(ids, output_hidden_states=False)
        ids2 = torch.zeros(batch, msl, dtype=torch.long, device=device)
        out["text_encoder_2"] = lambda: te2(ids2, output_hidden_states=False)
        tokens = (lh // 2) * (lw // 2)
        joint = int(tr.config.joint_attention_dim)
        pooled = int(tr.config.pooled_projection_dim)
        kw: dict[str, Any] = dict(
            hidden_states=tensor(batch, tokens, int(tr.config.in_channels)),
            encoder_hidden_states=tensor(batch, msl, joint), pooled_projections=tensor(batch, pooled),
            timestep=tensor(batch), txt_ids=tensor(msl, 3), img_ids=tensor(tokens, 3), return_dict=False,
        )
        if tr.config.guidance_embeds:
            kw["guidance"] = tensor(batch)
        out["transformer"] = lambda: tr(**kw)
    elif family in ("flux2", "qwenimage"):
        te, tr = pipe.text_encoder, pipe.transformer
        ids = torch.zeros(batch, msl, dtype=torch.long, device=device)
        # No attention mask (all tokens real): transformers inspects a given one's values, which meta cannot.
        te_kw: dict[str, Any] = dict(input_ids=ids, output_hidden_states=True, use_cache=False)
        if family == "qwenimage":
            # Qwen2.5-VL derives its 3-axis positions from the ids with data-dependent indexing, which a
            # meta tensor cannot do; text-only positions are the same arange on every axis.
            te_kw["position_ids"] = torch.arange(msl, device=device).expand(3, batch, msl)
        out["text_encoder"] = lambda: te(**te_kw)
        tokens = (lh // 2) * (lw // 2)
        joint = int(tr.config.joint_attention_dim)
        kw = dict(hidden_states=tensor(batch, tokens, int(tr.config.in_channels)),
                  encoder_hidden_states=tensor(batch, msl, joint), timestep=tensor(batch), return_dict=False)
        if family == "flux2":
            kw.update(img_ids=tensor(batch, tokens, 4), txt_ids=tensor(batch, msl, 4))
            if tr.config.guidance_embeds:
                kw["guidance"] = tensor(batch)
        else:
            kw.update(encoder_hidden_states_mask=tensor(batch, msl), img_shapes=[[(1, lh // 2, lw // 2)]] * batch)
        out["transformer"] = lambda: tr(**kw)
        if family == "qwenimage":  # a video VAE: one frame
            z5 = tensor(batch, lat_c, 1, lh, lw)
            out["vae"] = lambda: vae.decode(z5, return_dict=False)
            return out
    else:
        tr = pipe.transformer
        side = int(tr.config.sample_size)
        lh = lw = side
        x = tensor(rows, int(tr.config.in_channels), side, side)
        t = torch.zeros(rows, dtype=torch.long, device=device)
        labels = torch.zeros(rows, dtype=torch.long, device=device)
        out["transformer"] = lambda: tr(x, timestep=t, class_labels=labels, return_dict=False)
    z = tensor(batch, lat_c, lh, lw)
    out["vae"] = lambda: vae.decode(z, return_dict=False)
    return out


def count_work(model: str, *, height: int, width: int, batch: int = 1, max_sequence_length: int = 512,
               cfg: bool | None = None) -> Work:
    """Count the work of one generation of a built-in model by running its components on meta tensors.

    Args:
        model: a built-in name (``flux-dev-replica``, ``dit-xl-2-256``, ``tiny-flux``, ...).
        height: image pixels (DiT: ignored, its size is fixed by the model).
        width: as ``height``.
        batch: images per call.
        max_sequence_length: T5 tokens (FLUX).
        cfg: DiT classifier-free guidance (doubles the transformer's batch); None = the pipeline's
            default (on).

    Returns:
        The :class:`Work`; the transformer's entry is one denoising step.

    Raises:
        PipelineError: not a built-in.
    """
    from fluxtune.pipelines import BUILTINS, builtin

    spec = builtin(model)
    if spec is None:
        raise PipelineError(f"predict: {model!r} is not a built-in; use one of {', '.join(sorted(BUILTINS))}")
    if spec.family not in ("flux", "dit", "flux2", "qwenimage"):
        raise PipelineError(f"predict: latency is counted from FLUX.1, FLUX.2, Qwen-Image and DiT forwards only; "
                            f"{model} is a {spec.family} model; use fluxtune bench on a GPU")
    # One cache entry per distinct workload: FLUX has no CFG batch, DiT's size is the model's.
    if spec.family == "dit":
        return _cached_work(model, 0, 0, batch, 0, cfg is not False)
    return _cached_work(model, height, width, batch, max_sequence_length, False)


def _cached_work(model: str, height: int, width: int, batch: int, max_sequence_length: int, cfg: bool) -> Work:
    """:func:`_count_work`, remembered on disk (:mod:`fluxtune.diskcache`): ``fluxtune presets --gpu``
    asks for every preset's workload."""
    from fluxtune.diskcache import remembered

    def decode(data: dict[str, Any]) -> Work:
        comps = {n: ComponentWork(**c) for n, c in data.pop("components").items()}
        return Work(**{**data, "notes": tuple(data.get("notes", ())), "components": comps})

    return remembered("work", f"{model}-{height}x{width}-b{batch}-t{max_sequence_length}-cfg{int(cfg)}",
                      lambda: _count_work(model, height, width, batch, max_sequence_length, cfg), asdict, decode)


@functools.lru_cache(maxsize=64)
def _count_work(model: str, height: int, width: int, batch: int, max_sequence_length: int, cfg: bool) -> Work:
    import torch

    from fluxtune.pipelines import BUILTINS, load

    spec = BUILTINS[model]
    notes: list[str] = []
    pipe: Any
    try:
        pipe = load(model, device="meta", dtype="bfloat16")
        device = torch.device("meta")
    except Exception:  # noqa: BLE001 - small built-ins refuse meta in some builders: count them on the CPU
        pipe = load(model, device="cpu", dtype="bfloat16")
        device = torch.device("cpu")
        notes.append("counted on the CPU (the builder does not build on meta)")
    family = spec.family
    if family == "dit":
        side = int(pipe.transformer.config.sample_size) * 2 ** (len(pipe.vae.config.block_out_channels) - 1)
        height = width = side
    rows = batch * (2 if family == "dit" and cfg else 1)
    comps: dict[str, ComponentWork] = {}
    for name, fn in _forwards(pipe, family, height, width, batch, max_sequence_length, rows, device).items():
        module = getattr(pipe, name)
        c, extrapolated = _count_forward(fn, _taylorseer_modules(module) if name == "transformer" else ())
        comps[name] = ComponentWork(
            name=name, gemm_flops=c.gemm_flops, attn_flops=c.attn_flops, other_bytes=c.other_bytes,
            kernels=c.kernels, gemm_calls=c.gemm_calls, attn_calls=c.attn_calls,
            gemm_input_elems=c.gemm_input_elems, weight_params=float(sum(p.numel() for p in module.parameters())),
            conv_flops=c.conv_flops, extrapolated=extrapolated,
        )
    return Work(model=model, family=family, height=height, width=width, batch=batch,
                max_sequence_length=max_sequence_length, rows=rows, components=comps, notes=tuple(notes),
                pipeline=type(pipe).__name__)


# ---------------------------------------------------------------------------------------- latency


def _without_modulation(w: ComponentWork, facts: ModelFacts) -> ComponentWork:
    """A step's work with ``modulation.cache`` on: the modulation layers' GEMMs (one row each, counted as
    reads of their bf16 weights) and their weights' share of any dequantization are gone."""
    from fluxtune.memory.facts import MODULATION_RE

    t = facts.components.get("transformer")
    if t is None:
        return w
    gone = [leaf for leaf in t.leaves if re.search(MODULATION_RE, leaf.name)]
    params = float(sum(leaf.params for leaf in gone))
    return replace(w, other_bytes=max(0.0, w.other_bytes - 2.0 * params),
                   weight_params=max(0.0, w.weight_params - params), kernels=max(0, w.kernels - len(gone)),
                   gemm_calls=max(0, w.gemm_calls - len(gone)))


def compute_precision(method: str | None, capability: str, *, fp16_accumulate: bool = False) -> str:
    """The precision a quantization method's GEMMs compute in on a capability class.

    fp8_dynamic -> fp8 (bf16 on Ampere, which has no fp8 tensor cores); int8_dynamic -> int8;
    weight-only methods (int8/fp8/int4/NF4 weights), layerwise casting and none -> bf16, or fp16acc for a
    float16 component under ``matmul.fp16_accumulation`` (``fp16_accumulate``).
    """
    if method == "fp8_dynamic":
        return "fp8" if capability in _FP8_CLASSES else "bf16"
    if method == "int8_dynamic":
        return "int8"
    return "fp16acc" if fp16_accumulate and method != "int4_weight" else "bf16"


@dataclass(frozen=True)
class PhaseTime:
    """Predicted seconds of one phase (for ``steps``: one denoising step) and how they split."""

    name: str
    seconds: float
    gemm_s: float
    attn_s: float
    memory_s: float
    launch_s: float
    transfer_s: float
    precision: str

    @property
    def compute_s(self) -> float:
        """GPU time (GEMM + attention + memory-bound ops), floored by the CPU launch time."""
        return max(self.gemm_s + self.attn_s + self.memory_s, self.launch_s)

    @property
    def bound(self) -> str:
        """What limits the phase: transfer, launch (CPU), gemm, attention or memory."""
        if self.transfer_s > self.compute_s:
            return "transfer"
        if self.launch_s > self.gemm_s + self.attn_s + self.memory_s:
            return "launch"
        parts = {"gemm": self.gemm_s, "attention": self.attn_s, "memory": self.memory_s}
        return max(parts, key=lambda k: parts[k])


@dataclass(frozen=True)
class LatencyPrediction:
    """Predicted latency of one generation (never a measurement)."""

    gpu: str
    profile: str
    model: str
    height: int
    width: int
    steps: int
    batch: int
    total_s: float
    text_encode_s: float
    step: PhaseTime
    steps_s: float
    decode_s: float
    call_transfer_s: float
    phases: dict[str, PhaseTime]
    floor_s: float
    assumptions: tuple[str, ...]
    passes: int = 1
    """Transformer passes per step: 2 with true CFG (``generation.negative_prompt``)."""
    cfg_batched: bool = False
    """The two passes run as one forward of both rows (``generation.batch_cfg``); ``step`` is that forward."""
    computed_steps: int | None = None
    """Steps the transformer computes when a cache with a known schedule (magcache) skips the others."""

    def describe(self) -> str:
        """One line; always says "predicted"."""
        return (f"predicted {self.total_s:.2f} s on {self.gpu} for {self.profile} ({self.model}, "
                f"{self.width}x{self.height}, {self.steps} steps): text {self.text_encode_s:.2f} s, "
                f"{self.steps} x {self.step.seconds:.3f} s/step ({self.step.bound}-bound)"
                + (" (true CFG, both rows in one forward)" if self.cfg_batched else
                   f" x {self.passes} passes (true CFG)" if self.passes > 1 else "") + ", decode "
                f"{self.decode_s:.2f} s; compute floor {self.floor_s:.2f} s")


def _gemm_eff(precision: str, method: str | None, scale: float, k: dict[str, float]) -> float:
    """The efficiency of a phase's GEMMs: int4 weight-only has its own kernel (tinygemm); float16
    accumulate is a fraction of bf16's (after the cap: the published ratio is of achieved rates)."""
    if precision == "fp16acc":
        return min(1.0, scale * k["gemm_eff_bf16"]) * k["fp16acc_vs_bf16"]
    key = "gemm_eff_int4_weight" if method == "int4_weight" else f"gemm_eff_{precision}"
    return min(1.0, scale * k.get(key, k["gemm_eff_bf16"]))


def _phase(name: str, w: ComponentWork, gpu: GpuSpec, precision: str, *, compiled: bool, method: str | None,
           dynamic: bool, transfer_bytes: float, transfer_rate: float, overlapped: bool,
           k: dict[str, float]) -> PhaseTime:
    bf16 = gpu.rate("bf16") or 1.0
    rate = gpu.rate(precision) or bf16
    scale = 1.0 if gpu.capability == "hopper" else k["non_hopper_scale"]
    eff = _gemm_eff(precision, method, scale, k)
    conv_eff = min(1.0, scale * k["conv_eff"])
    gemm = (w.gemm_flops - w.conv_flops) / (rate * 1e12 * eff) + w.conv_flops / (bf16 * 1e12 * conv_eff)
    attn = w.attn_flops / (bf16 * 1e12 * min(1.0, scale * k["attn_eff"]))
    bw = (gpu.memory_bandwidth_gbs or 500.0) * 1e9 * k["bw_eff"] * scale
    other = w.other_bytes * (k["compiled_traffic"] if compiled else 1.0)
    if method == "nf4":
        other += w.weight_params * k["nf4_bytes_per_param"]
    elif method in ("int8_weight", "fp8_weight"):
        other += w.weight_params * k["weight_only_bytes_per_param"] * (0.25 if compiled else 1.0)
    if dynamic:
        other += w.gemm_input_elems * k["dynamic_quant_bytes_per_input"] * (0.5 if compiled else 1.0)
    memory = other / bw
    kernels = (w.gemm_calls + w.attn_calls) * k["compiled_kernels_per_gemm"] if compiled else w.kernels
    launch = kernels * k["launch_s"]
    transfer = transfer_bytes / transfer_rate if transfer_bytes else 0.0
    compute = max(gemm + attn + memory, launch)
    if transfer and overlapped:
        seconds = max(compute, transfer) + k["overlap_penalty"] * min(compute, transfer)
    else:
        seconds = compute + transfer
    return PhaseTime(name=name, seconds=seconds, gemm_s=gemm, attn_s=attn, memory_s=memory, launch_s=launch,
                     transfer_s=transfer, precision=precision)


_FAMILY_MODEL = {"flux": "flux-dev-replica", "dit": "dit-xl-2-256", "flux2": "flux2-dev-replica",
                 "qwenimage": "qwen-image-replica"}


def predict_latency(
    profile: Profile,
    gpu: GpuSpec,
    *,
    model: str | None = None,
    height: int | None = None,
    width: int | None = None,
    steps: int | None = None,
    batch: int | None = None,
    constants: dict[str, float] | None = None,
) -> LatencyPrediction:
    """Predict one generation's latency of a profile on a GPU from the GPU table.

    Args:
        profile: the profile (its variant for the card's class, if the caller resolved one).
        gpu: the card (:func:`fluxtune.gpus.find_gpu`).
        model: a built-in; default the profile's measured model, else the family's full-size replica.
        height: pixels; default the profile's generation size, else 1024 (DiT: fixed by the model).
        width: as ``height``.
        steps: denoising steps; default the profile's.
        batch: images per call; default the profile's ``images_per_prompt``.
        constants: overrides of :data:`CONSTANTS` (for fitting).

    Returns:
        The :class:`LatencyPrediction`.

    Raises:
        PipelineError: the model is not a built-in.
    """
    from fluxtune.memory import ModelFacts, transfer_bytes

    k = {**CONSTANTS, **(constants or {})}
    g = profile.generation
    if model is None:
        model = (profile.measured.model if profile.measured is not None else None) or _FAMILY_MODEL.get(
            profile.family, "flux-dev-replica")
    from fluxtune.pipelines import builtin

    spec = builtin(model)
    if spec is not None and spec.family != profile.family:
        raise PipelineError(f"predict: {model} is a {spec.family} model and profile {profile.name!r} is for "
                            f"{profile.family}; pass --model with a {profile.family} built-in "
                            f"(e.g. {_FAMILY_MODEL.get(profile.family, 'flux-dev-replica')})")
    from fluxtune.tuning.cache import family_problem

    refused = family_problem(profile.cache.kind, spec.family if spec is not None else profile.family)
    if refused:  # apply refuses it on this family: nothing to predict
        raise ProfileError(f"predict: {refused}")
    h = int(height or g.height or 1024)
    w = int(width or g.width or 1024)
    n_steps = int(steps or g.steps)
    b = int(batch or g.images_per_prompt)
    work = count_work(model, height=h, width=w, batch=b, max_sequence_length=g.max_sequence_length,
                      cfg=g.guidance > 1)
    passes = true_cfg(work, g)
    # Batched true CFG: one transformer forward of both rows a step (streamed blocks copied once).
    batched = passes > 1 and g.batch_cfg
    rows = 2 * b if batched else b
    tiles, tiled_work = _regional(profile, model, h, w, rows)
    if batched and tiled_work is None:
        tiled_work = count_work(model, height=h, width=w, batch=rows,
                                max_sequence_length=g.max_sequence_length).components["transformer"]
    facts = ModelFacts.for_builtin(model)
    moved = transfer_bytes(profile, facts)
    cls = gpu.capability
    assumptions: list[str] = list(work.notes)
    assumptions.append(f"work counted on {model} at {work.width}x{work.height}, batch {b}"
                       + (f" ({work.rows} transformer rows with CFG)" if work.rows != b else ""))
    compiled = profile.compile.mode != "off"
    phases: dict[str, PhaseTime] = {}
    call_transfer = 0.0
    for name, cw in work.components.items():
        comp = profile.component(name)
        q = comp.quantize
        method = q.method if q is not None else None
        prec = compute_precision(method, cls, fp16_accumulate=profile.matmul.fp16_accumulation
                                 and comp.dtype == "float16")
        if method == "fp8_dynamic" and cls not in _FP8_CLASSES:
            assumptions.append(f"{name}.quantize=fp8_dynamic does not compute on {cls} (no fp8 tensor cores): "
                               "counted at bf16; apply would refuse it or pick the class's variant")
        elif method == "fp8_dynamic" and q is not None and q.granularity == "row" and cls != "hopper":
            assumptions.append(f"{name}: fp8 row-wise runs on Hopper only; counted at the card's fp8 rate "
                               "(the tensor-wise variant)")
        if prec != "bf16" and gpu.rate(prec) is None:
            assumptions.append(f"{gpu.name} lists no {prec} rate: {name} counted at bf16")
            prec = "bf16"
        nbytes, unit = moved.get(name, (0.0, "call"))
        offload = comp.offload
        mode = getattr(offload, "mode", "none")
        rate_key = {"partial": "h2d_eff_partial", "group": "h2d_eff_group", "model": "h2d_eff_model",
                    "sequential": "h2d_eff_sequential"}.get(mode, "h2d_eff_partial")
        rate = gpu.h2d_gbs * 1e9 * k[rate_key]
        overlapped = mode in ("partial", "group") and getattr(offload, "use_stream", True)
        per_phase = nbytes if (unit == "step" or name != "transformer") else 0.0
        if name == "transformer" and unit == "call":
            call_transfer += nbytes / rate if nbytes else 0.0
        phase = functools.partial(
            _phase, name, gpu=gpu, precision=prec, compiled=compiled and name == "transformer", method=method,
            dynamic=method in ("fp8_dynamic", "int8_dynamic") and prec != "bf16",
            transfer_bytes=per_phase, transfer_rate=rate, overlapped=overlapped, k=k)
        if name != "transformer":
            phases[name] = phase(cw)
            continue
        step_work = tiled_work if tiled_work is not None else cw
        if profile.modulation.cache:
            step_work = _without_modulation(step_work, facts)

        def transformer_phase(w: ComponentWork, phase: Any = phase) -> PhaseTime:
            # Regional denoising runs every block once per tile (streamed blocks are copied once per tile).
            p = phase(w)
            return p if tiles == 1 else replace(
                p, seconds=p.seconds * tiles, gemm_s=p.gemm_s * tiles, attn_s=p.attn_s * tiles,
                memory_s=p.memory_s * tiles, launch_s=p.launch_s * tiles, transfer_s=p.transfer_s * tiles)

        phases[name] = transformer_phase(step_work)
    step = phases["transformer"]
    t_q = profile.component("transformer").quantize
    t_method = t_q.method if t_q is not None else None
    # True CFG encodes the negative prompt too and runs the transformer once more a step.
    text = passes * sum(p.seconds for n, p in phases.items() if n.startswith("text_encoder")) + k["call_overhead_s"]
    decode = phases["vae"].seconds if "vae" in phases else 0.0
    computed, computed_s, skipped_s = n_steps, step.seconds, 0.0
    if isinstance(profile.cache, MagCache):
        from fluxtune.tuning.cache import magcache_schedule

        computed = sum(magcache_schedule(profile.cache, n_steps))
        # A skipped step runs the embedders, the last norm and projection and the cache's residual add.
        skipped_s = k["cache_skipped_step"] * step.seconds
    elif isinstance(profile.cache, TaylorSeerCache) and step_work.extrapolated:
        from fluxtune.tuning.cache import taylorseer_schedule

        computed = sum(taylorseer_schedule(profile.cache, n_steps))
        # An extrapolated step runs all but the attention modules, whose outputs come from the Taylor factors
        # (float32, max_order + 1 of them): about 16 bytes per output element and order, elementwise.
        orders = profile.cache.max_order + 1
        out_elems = step_work.extrapolated["out_elems"]
        skipped_s = transformer_phase(step_work.without_extrapolated(out_elems * 16.0 * orders)).seconds
        # A computed step also updates the factors: reads the outputs, writes max_order + 1 float32 differences.
        computed_s = transformer_phase(replace(step_work, other_bytes=step_work.other_bytes
                                               + out_elems * (2.0 + 8.0 * orders))).seconds
    steps_s = (computed * computed_s + (n_steps - computed) * skipped_s) * (1 if batched else passes)
    total = text + steps_s + decode + call_transfer
    scale = 1.0 if cls == "hopper" else k["non_hopper_scale"]
    assumptions += [
        f"GEMMs at {step.precision} ({gpu.rate(step.precision) or gpu.rate('bf16'):g} TFLOPS dense x "
        f"{_gemm_eff(step.precision, t_method, scale, k):.2f})"
        + (" (torchao int4 weight-only: tinygemm, made for few rows)" if t_method == "int4_weight" else "")
        + ", attention at bf16 x "
        f"{min(1.0, scale * k['attn_eff']):.2f}, memory-bound ops at {gpu.memory_bandwidth_gbs or 500:g} GB/s x "
        f"{scale * k['bw_eff']:.2f}"
        + (f" (compiled: x{k['compiled_traffic']:.2f} of eager bytes)" if compiled else " (eager)"),
        f"host->device {gpu.h2d_gbs:g} GB/s; streamed copies overlap compute: max(compute, copy) + "
        f"{k['overlap_penalty']:.2f} x min(...)",
        "efficiencies fitted on an H200 (FLUX.1-dev replica, 1024x1024, 28 steps)"
        + ("" if cls == "hopper" else f", scaled x{k['non_hopper_scale']:.2f} for non-Hopper cards (fitted on one "
           "published L20 figure)"),
        "the text encoders and VAE run eager",
    ]
    if profile.family in ("flux2", "qwenimage"):
        assumptions.append(f"no {profile.family} run is in the fit: its blocks are assumed as efficient as "
                           "FLUX.1's; text tokens counted at max_sequence_length "
                           f"({g.max_sequence_length}), an upper bound where the pipeline pads less")
    if passes > 1:
        assumptions.append(f"true CFG (generation.negative_prompt set): {passes} transformer passes a step"
                           + (" run as one forward of both rows (generation.batch_cfg: streamed blocks copied "
                              "once a step)" if batched else "")
                           + ", the text encoder run for the negative prompt too")
    if isinstance(profile.cache, TaylorSeerCache) and computed != n_steps:
        c2 = profile.cache
        assumptions.append(f"cache.kind=taylorseer computes {computed} of {n_steps} steps (diffusers' schedule: "
                           f"{c2.disable_cache_before_step} warm-up steps, then one in {c2.cache_interval}); the "
                           f"others extrapolate the blocks' attention modules (order {c2.max_order}) and run the "
                           "rest, streamed blocks included; what extrapolating costs in quality is not predicted")
    if isinstance(profile.cache, MagCache):
        c = profile.cache
        assumptions.append(f"cache.kind=magcache computes {computed} of {n_steps} steps (diffusers' schedule from "
                           f"FLUX.1's magnitude ratios, threshold {c.threshold:g}, max_skip_steps "
                           f"{c.max_skip_steps}, retention_ratio {c.retention_ratio:g}); a skipped step counted at "
                           f"{k['cache_skipped_step']:.0%} of a computed one (assumed); the compute floor counts "
                           "every step; what skipping costs in quality is not predicted")
    elif profile.cache.kind not in ("none", "taylorseer"):
        assumptions.append(f"cache.kind={profile.cache.kind} decides at run time from the run's own values: its "
                           "skips are not counted here (an upper bound)")
    if tiles > 1:
        t = profile.tiling
        assumptions.append(f"regional denoising: {tiles} tiles of {t.tile}x{t.tile} px (overlap {t.overlap}) a step, "
                           "each a full transformer pass at the tile's size (blending not counted); the compute "
                           "floor stays the whole image's")
    floor = compute_floor(gpu, model, height=h, width=w, steps=n_steps, batch=b,
                          max_sequence_length=g.max_sequence_length, cfg=g.guidance > 1, passes=passes)
    return LatencyPrediction(
        gpu=gpu.name, profile=profile.name, model=model, height=work.height, width=work.width, steps=n_steps,
        batch=b, total_s=total, text_encode_s=text, step=step, steps_s=steps_s, decode_s=decode,
        call_transfer_s=call_transfer, phases=phases, floor_s=floor, assumptions=tuple(assumptions), passes=passes,
        cfg_batched=batched, computed_steps=computed if computed != n_steps else None,
    )


def true_cfg(work: Work, g: Generation) -> int:
    """Transformer passes per step of the counted pipeline with the profile's call defaults (1 or 2).

    Raises:
        ProfileError: the profile sets true-CFG fields the pipeline does not take (``apply`` refuses them too).
    """
    from fluxtune.tuning.generation import pipeline_call_params, true_cfg_passes, true_cfg_problem

    params = pipeline_call_params(work.pipeline) or {}
    problem = true_cfg_problem(params, g, work.pipeline or work.model)
    if problem is not None:
        raise ProfileError(problem)
    return true_cfg_passes(params, g)


def _regional(profile: Profile, model: str, height: int, width: int, batch: int) -> tuple[int, ComponentWork | None]:
    """Tiles per step and the transformer's work on one tile, when the profile denoises by regions."""
    t = profile.tiling
    if t.mode != "regional" or profile.family != "flux" or (height <= t.tile and width <= t.tile):
        return 1, None
    from fluxtune.tuning.regional import TOKEN_PX, tile_starts

    tile, overlap = t.tile // TOKEN_PX, t.overlap // TOKEN_PX
    n = len(tile_starts(height // TOKEN_PX, tile, overlap)) * len(tile_starts(width // TOKEN_PX, tile, overlap))
    side_h, side_w = min(t.tile, height), min(t.tile, width)
    work = count_work(model, height=side_h, width=side_w, batch=batch,
                      max_sequence_length=profile.generation.max_sequence_length)
    return n, work.components["transformer"]


def fastest_gemm_precision(gpu: GpuSpec) -> str:
    """The precision fluxtune computes GEMMs in that has the card's highest dense rate: fp8 (fp8_dynamic,
    where the class computes fp8), int8 (int8_dynamic) or bf16; fp8 on a tie.

    Not always fp8: a GeForce card accumulates fp8 in fp32 at half its fp8 marketing rate, while int8
    accumulates in int32 at the full rate, so on an RTX 4060 int8 (120.9 TOPS) is twice fp8 (60.5).
    """
    rates = {"bf16": gpu.rate("bf16") or 0.0, "int8": gpu.rate("int8") or 0.0,
             "fp8": (gpu.rate("fp8") or 0.0) if gpu.capability in _FP8_CLASSES else 0.0}
    return max(("fp8", "int8", "bf16"), key=lambda p: rates[p])


def compute_floor(gpu: GpuSpec, model: str, *, height: int, width: int, steps: int, batch: int = 1,
                  max_sequence_length: int = 512, cfg: bool | None = None, passes: int = 1) -> float:
    """The compute floor of a generation: no card runs it faster with fluxtune's precisions.

    Counted as: every component's GEMM FLOPs (text encoders once, the transformer ``steps`` times,
    the VAE decode once) at the card's fastest GEMM rate (:func:`fastest_gemm_precision`: fp8, int8 or
    bf16, whichever the table lists fastest), plus all attention FLOPs at the bf16 rate, both at 100 %
    efficiency; memory-bound work, launches and transfers count zero. 4-bit (W4A4) is left out: no
    fluxtune knob computes in it. ``passes`` = 2 counts true CFG (the transformer and text encoders twice).
    """
    work = count_work(model, height=height, width=width, batch=batch, max_sequence_length=max_sequence_length,
                      cfg=cfg)
    gemm_rate = (gpu.rate(fastest_gemm_precision(gpu)) or 1.0) * 1e12
    attn_rate = (gpu.rate("bf16") or 1.0) * 1e12
    total = 0.0
    for name, cw in work.components.items():
        n = passes * (steps if name == "transformer" else 1) if name != "vae" else 1
        total += n * (cw.gemm_flops / gemm_rate + cw.attn_flops / attn_rate)
    return total


def resolve_for_card(profile: Profile, gpu: GpuSpec) -> Profile:
    """The profile's variant for the card's capability class when profiles have variants, else itself."""
    for_class = getattr(profile, "for_class", None)
    if callable(for_class):
        try:
            resolved = for_class(gpu.capability)
        except ProfileError:
            raise
        return resolved if resolved is not None else profile
    return profile


@dataclass(frozen=True)
class EmulatedCheck:
    """One shipped preset's emulated measurement beside its prediction on the lab GPU with the card's link."""

    preset: str
    variant: str
    card: str
    model: str
    measured_s: float
    predicted_s: float

    @property
    def error(self) -> float:
        return (self.predicted_s - self.measured_s) / self.measured_s


def emulated_on(card: GpuSpec, lab: GpuSpec, h2d_gbs: float | None = None) -> GpuSpec:
    """The lab GPU as ``--emulate card`` runs it: the lab's compute and memory bandwidth, the card's
    host->device rate (``h2d_gbs`` where a measured block recorded the rate it paced to).

    Raises:
        ProfileError: the card has more memory than the lab GPU (emulation would refuse it).
    """
    if card.memory_gib > lab.memory_gib:
        raise ProfileError(f"--emulated-on={lab.name!r}: {card.name} has {card.memory_gib:g} GiB, more than "
                           f"{lab.name}'s {lab.memory_gib:g} GiB; pick a GPU with at least the card's memory")
    return lab.model_copy(update={"h2d_gbs": float(h2d_gbs or card.h2d_gbs)})


def check_against_emulated() -> list[EmulatedCheck]:
    """Predict every emulated measured block of the shipped presets and pair it with its measurement.

    An emulated run computes at the lab GPU's speed with the card's host->device rate, so it is predicted
    on the lab GPU's table row with the card's ``h2d_gbs``: a check of the work counting and the copy /
    compute overlap on every family, not of the per-card efficiencies.
    """
    from fluxtune.gpus import find_gpu
    from fluxtune.presets import list_presets, load_profile

    out: list[EmulatedCheck] = []
    for name in sorted(list_presets()):
        for variant, _classes, resolved in load_profile(name).variant_table():
            m = resolved.measured
            hw = m.hardware if m is not None else None
            if m is None or m.latency_s is None or not hw or not hw.get("emulated_on"):
                continue
            card = find_gpu(str(hw["name"]))
            lab = emulated_on(card, find_gpu(str(hw["emulated_on"]).removeprefix("NVIDIA ")), hw.get("h2d_gbs"))
            wl = m.workload or {}
            p = predict_latency(resolved, lab, model=m.model, height=wl.get("height"), width=wl.get("width"),
                                steps=wl.get("steps"))
            out.append(EmulatedCheck(name, variant, card.name, str(m.model), float(m.latency_s), p.total_s))
    return out
