"""quantize: torchao ``quantize_`` on each component's Linear layers (NF4: bitsandbytes, through
:mod:`fluxtune.tuning.nf4`). The only torchao importer: the handler, LoRA switching and the sensitivity
scan all go through :func:`quantize_module`."""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from typing import Any

from fluxtune.errors import MissingDependencyError
from fluxtune.knobs import Quantize
from fluxtune.tuning import nf4
from fluxtune.tuning.base import QUANTIZE, Context, Handler, register
from fluxtune.tuning.state import set_weight_plan, weight_plan


def torchao_config(q: Quantize, *, on_cuda: bool, grouped: bool = True) -> Any:
    """The torchao 0.18 ``AOBaseConfig`` for a profile's quantize section.

    ``set_inductor_config=False`` everywhere: torchao would otherwise flip global inductor flags,
    and trials in one process must not leak settings into each other (the compile knob sets them).
    ``grouped``: int8_weight scales per ``group_size`` inputs (False: per output row, for layers whose
    inputs the groups do not tile).
    """
    try:
        from torchao.quantization import (
            Float8DynamicActivationFloat8WeightConfig,
            Float8WeightOnlyConfig,
            Int4WeightOnlyConfig,
            Int8DynamicActivationInt8WeightConfig,
            Int8WeightOnlyConfig,
            PerGroup,
            PerRow,
            PerTensor,
        )
    except ImportError as e:  # pragma: no cover - torchao is a core dependency
        raise MissingDependencyError(f"quantize needs torchao: pip install torchao ({e})") from e
    gran = PerRow() if q.granularity == "row" else PerTensor()
    if q.method == "int8_weight":
        # Per-group scales, not torchao's per-row default: with a per-row scale TorchInductor rewrites
        # mm(x, w.to(bf16)) * scale into aten._weight_int8pack_mm, a kernel made for a few rows that ran
        # a compiled DiT-XL/2 step at batch 8 ~110x slower on an H200 (4.04 s against 0.037 s). Grouped weights are
        # dequantized and multiplied by cuBLAS instead, eager or compiled.
        return Int8WeightOnlyConfig(granularity=PerGroup(q.group_size) if grouped else PerRow(),
                                    set_inductor_config=False)
    if q.method == "int8_dynamic":
        return Int8DynamicActivationInt8WeightConfig(granularity=gran, set_inductor_config=False)
    if q.method == "fp8_dynamic":
        return Float8DynamicActivationFloat8WeightConfig(granularity=gran, set_inductor_config=False)
    if q.method == "fp8_weight":
        return Float8WeightOnlyConfig(set_inductor_config=False)
    # int4: the default PLAIN packing needs the mslk kernels; tinygemm's layout works on CUDA.
    fmt = "tile_packed_to_4d" if on_cuda else "opaque"
    return Int4WeightOnlyConfig(group_size=q.group_size, int4_packing_format=fmt, set_inductor_config=False)


def quantized_linear_count(module: Any) -> tuple[int, int]:
    """(quantized, total) nn.Linear layers; a quantized weight is a torchao tensor subclass."""
    import torch

    linears = [m for m in module.modules() if isinstance(m, torch.nn.Linear)]
    return sum(1 for m in linears if _is_subclass_weight(m.weight)), len(linears)


def _is_subclass_weight(weight: Any) -> bool:
    import torch

    if nf4.is_nf4(weight):
        return True
    data = weight.data if isinstance(weight, torch.nn.Parameter) else weight
    return type(data) is not torch.Tensor


def output_embedding(module: Any) -> str | None:
    """The qualified name of a text encoder's language-model head (``lm_head``), which no layer quantizes.

    Diffusion pipelines read the encoder's hidden states, never its logits, but transformers still
    computes them. Quantized, the head costs more than it saves: tied to the input embedding (Qwen3)
    it becomes a second copy, and int8's per-group dequantization makes a float32 copy of the whole
    vocabulary matrix on every call (1.6 GB for Qwen3-4B, 2.7 GB for Mistral-Small: it ran the 8 GB
    FLUX.2 [klein] profile out of memory on the H200). None when there is no such Linear.
    """
    import torch

    get = getattr(module, "get_output_embeddings", None)
    head = get() if callable(get) else None
    if not isinstance(head, torch.nn.Linear):
        return None
    # A direct child in transformers' models (lm_head): found without walking the whole tree, which the
    # materializer would otherwise do once per streamed unit.
    for walk in (module.named_children, module.named_modules):
        name = next((n for n, m in walk() if m is head), None)
        if name is not None:
            return name
    return None


def linear_filter(q: Quantize, excluded: list[str], head: str | None = None) -> Any:
    """quantize_'s filter: Linear layers not matching ``exclude`` (skipped names go to ``excluded``),
    nor the output embedding ``head`` (see :func:`output_embedding`)."""
    import torch

    patterns = [re.compile(p) for p in q.exclude]

    def keep(mod: torch.nn.Module, fqn: str) -> bool:
        if not isinstance(mod, torch.nn.Linear):
            return False
        if fqn == head:
            excluded.append(fqn)
            return False
        if {"lora_A", "lora_B"} & set(fqn.split(".")):
            return False  # peft's LoRA factors stay high precision: a hot-swap copies new weights into them
        if any(p.search(fqn) for p in patterns):
            excluded.append(fqn)
            return False
        if q.method == "int4_weight" and not q.tiles(mod.in_features):
            excluded.append(fqn)  # int4 groups must tile the input features
            return False
        return True

    return keep


def quantize_module(module: Any, q: Quantize, *, on_cuda: bool, device: Any = None,
                    only: Callable[[str], bool] | None = None) -> tuple[list[str], list[str]]:
    """Quantize ``module``'s Linear layers with torchao as ``q`` says; the one call of ``quantize_``.

    Args:
        module: the module to quantize in place.
        q: the profile's quantize section (method, granularity, exclude patterns).
        on_cuda: whether the kernels will run on a CUDA GPU (int4's packing depends on it).
        device: quantize layer by layer onto this device (None: where the weights are).
        only: further restricts the layers to those whose qualified name it accepts.

    Returns:
        The qualified names of the layers quantized, and of those ``q`` kept in higher precision.
    """
    excluded: list[str] = []
    keep = linear_filter(q, excluded, output_embedding(module))
    done: list[str] = []
    if q.method == "nf4":
        for fqn, mod in list(module.named_modules()):
            if (only is None or only(fqn)) and keep(mod, fqn) and not nf4.is_nf4(mod.weight):
                if device is not None:
                    mod.to(device)
                nf4.quantize_linear(mod)
                done.append(fqn)
        return done, excluded

    from torchao.quantization import quantize_

    def chosen(mod: Any, fqn: str) -> bool:
        if only is not None and not only(fqn):
            return False
        if keep(mod, fqn):
            done.append(fqn)
            return True
        return False

    if q.method != "int8_weight":
        quantize_(module, torchao_config(q, on_cuda=on_cuda), filter_fn=chosen, device=device)
        if q.method == "int8_dynamic":
            _route_few_rows(module, done)
        return done, excluded
    # int8 weight-only: per-group scales where the groups tile the inputs, per-row scales elsewhere.
    for grouped in (True, False):
        def tiled(mod: Any, fqn: str, grouped: bool = grouped) -> bool:
            inputs = getattr(mod, "in_features", None)
            return inputs is not None and q.tiles(inputs) == grouped and chosen(mod, fqn)

        quantize_(module, torchao_config(q, on_cuda=on_cuda, grouped=grouped), filter_fn=tiled, device=device)
    return done, excluded


FEW_ROWS_HOOK = "fluxtune_int8_few_rows"
INT_MM_MAX_ROWS = 16
"""torch._int_mm on CUDA needs more than 16 rows; int8 W8A8 layers called with fewer multiply by their
dequantized weight (:func:`_route_few_rows`)."""


def _few_rows_class() -> type:
    from diffusers.hooks import ModelHook

    class FewRowsInt8(ModelHook):
        """AdaLN and embedder linears see one row per image (FLUX at batch 1: one; DiT at batch 8 with
        guidance: 16), which torch._int_mm refuses on CUDA ("self.size(0) needs to be greater than 16"):
        those calls multiply by the dequantized weight; token-sized calls keep the int8 kernel."""

        def new_forward(self, module: Any, x: Any, *args: Any, **kwargs: Any) -> Any:
            import torch

            if x.numel() // max(x.shape[-1], 1) <= INT_MM_MAX_ROWS:
                bias = None if module.bias is None else module.bias.to(x.dtype)
                return torch.nn.functional.linear(x, module.weight.dequantize().to(x.dtype), bias)
            return self.fn_ref.original_forward(x, *args, **kwargs)  # type: ignore[misc]

    return FewRowsInt8


def _route_few_rows(module: Any, names: list[str]) -> None:
    """Give each int8 W8A8 layer in ``names`` the few-rows path (once: LoRA re-quantization calls again)."""
    from diffusers.hooks import HookRegistry

    cls = _few_rows_class()
    for name in names:
        linear = module.get_submodule(name) if name else module
        registry = HookRegistry.check_if_exists_or_initialize(linear)
        if registry.get_hook(FEW_ROWS_HOOK) is None:
            registry.register_hook(cls(), FEW_ROWS_HOOK)


@register
class QuantizeHandler(Handler):
    name = "quantize"
    phase = QUANTIZE
    reversible = False

    def check(self, ctx: Context) -> list[str]:
        problems = []
        for name in ctx.components():
            q = ctx.profile.component(name).quantize
            if q is None:
                continue
            if q.method == "int4_weight" and not ctx.on_gpu:
                problems.append(f"{name}.quantize.method=int4_weight needs a CUDA GPU here; use int8_weight on CPU")
            if q.method == "nf4":
                mode = getattr(ctx.profile.component(name).offload, "mode", "none")
                if mode not in ("none", "model"):
                    problems.append(f"{name}.quantize.method=nf4 with {name}.offload.mode={mode}: bitsandbytes "
                                    "keeps its scales beside the weight, where streaming does not move them; use "
                                    "offload none or model, or int4_weight")
                if not nf4.available():
                    problems.append(f"{name}.quantize.method=nf4 needs bitsandbytes: pip install 'fluxtune[nf4]'")
        return problems

    def apply(self, ctx: Context) -> None:
        from fluxtune.tuning.materialize import WeightPlan

        for name, module in ctx.components().items():
            q = ctx.profile.component(name).quantize
            if q is None:
                continue
            warn = ""
            if q.method == "int8_dynamic" and not ctx.profile.compile.enabled and ctx.on_gpu:
                # Measured on the H200: W8A8 in eager mode ran DiT-XL/2 25x slower than bf16.
                warn = "; warning: int8_dynamic without compile is very slow on GPU"
            plan = weight_plan(module)
            if (plan is not None and plan.source is not None) or ctx.on_gpu:
                # Weights still in the checkpoint, or a GPU to quantize on: placement quantizes each block
                # on the device as it places it (no full-precision copy of the whole component anywhere;
                # host weights reach the GPU through page-locked staging, 2-3x a layer-by-layer copy).
                set_weight_plan(module, WeightPlan(source=plan.source if plan else None, quantize=q))
                where = "the GPU" if ctx.on_gpu else str(ctx.device)
                ctx.report.add(self.name, name, f"{q.method}: done on {where} block by block while placing{warn}")
                continue

            t0 = time.perf_counter()
            _, excluded = quantize_module(module, q, on_cuda=False)
            n_q, n_all = quantized_linear_count(module)
            extra = f", {len(excluded)} kept in higher precision" if excluded else ""
            ctx.report.add(self.name, name, f"{q.method}: {n_q}/{n_all} Linear layers{extra}",
                           seconds=time.perf_counter() - t0)
