"""loras: load LoRA files (safetensors only) as fused weights, peft adapters or hot-swappable adapters.

Runs after fuse_qkv and before quantization, so a fused LoRA is quantized together with its base weight.
Fuse mode first keeps a pristine host copy of every transformer Linear, so switching LoRAs later
(:func:`fluxtune.set_loras`) restores and re-quantizes from it, never un-fusing quantized weights.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from fluxtune.errors import IncompatibleKnobsError
from fluxtune.knobs import Lora
from fluxtune.tuning.base import LORA, Context, Handler, register
from fluxtune.tuning.state import set_lora_state

_LORA_KEY_PARTS = ("lora_A", "lora_B", "lora_down", "lora_up", "lora.down", "lora.up")


@dataclass(frozen=True)
class LoraFile:
    """What a LoRA file changes: the transformer modules it targets and its largest rank."""

    path: str
    targets: frozenset[str]
    rank: int


@dataclass
class LoraState:
    """Kept on the pipeline (:func:`fluxtune.tuning.state.lora_state`) so :func:`fluxtune.set_loras` can switch LoRAs."""

    mode: str
    loras: tuple[Lora, ...] = ()
    pristine: dict[str, tuple[Any, Any]] = field(default_factory=dict)
    """fuse mode: module name -> (weight, bias) host copies taken before any LoRA was fused."""
    fused_targets: set[str] = field(default_factory=set)
    """fuse mode: modules whose weights currently hold a fused LoRA."""
    loaded: dict[str, str] = field(default_factory=dict)
    """adapter/hotswap mode: adapter name -> path of the weights it holds."""
    hotswap_rank: int = 0
    hotswap_targets: frozenset[str] = frozenset()
    hotswap_base: dict[tuple[str, str], float] = field(default_factory=dict)
    """hotswap mode: (module name, slot) -> alpha/rank of the LoRA in that slot (its scaling at scale 1)."""


def inspect_lora(lora: Lora, pipe: Any) -> LoraFile:
    """Check that ``lora.path`` is a LoRA for this pipeline's transformer, without changing the pipeline.

    Raises:
        IncompatibleKnobsError: missing file, not safetensors, no LoRA keys, targets or shapes that do not
            exist in the transformer, or LoRA layers for other components (one line naming the file).
    """
    import torch
    from safetensors import SafetensorError, safe_open

    path = lora.path
    where = f"loras: {path}"
    if not Path(path).is_file():
        raise IncompatibleKnobsError(f"{where}: no such file; give the path of a .safetensors LoRA file")
    loader = getattr(type(pipe), "lora_state_dict", None)
    transformer = getattr(pipe, "transformer", None)
    if loader is None or not hasattr(pipe, "load_lora_weights") or not isinstance(transformer, torch.nn.Module):
        raise IncompatibleKnobsError(
            f"{where}: {type(pipe).__name__} has no diffusers LoRA loader; LoRAs apply to FLUX-style pipelines")
    try:
        with safe_open(path, framework="pt") as f:
            raw = list(f.keys())
    except (SafetensorError, OSError, ValueError) as e:
        raise IncompatibleKnobsError(f"{where}: not a readable safetensors file ({e})") from None
    if not any(part in k for k in raw for part in _LORA_KEY_PARTS):
        raise IncompatibleKnobsError(
            f"{where}: not a LoRA (none of its {len(raw)} tensors is a lora_A/lora_B or lora_down/lora_up "
            "weight); pass a LoRA file, not a model checkpoint")
    try:
        out = loader(path)
    except Exception as e:  # diffusers' format converters raise many kinds on foreign layouts
        raise IncompatibleKnobsError(f"{where}: diffusers cannot read this LoRA for "
                                     f"{type(pipe).__name__}: {str(e).splitlines()[0][:200]}") from None
    state = out[0] if isinstance(out, tuple) else out
    targets: dict[str, dict[str, Any]] = {}
    for key, tensor in state.items():
        if ".lora_" not in key:
            continue
        module, _, rest = key.partition(".lora_")
        prefix, _, name = module.partition(".")
        if prefix != "transformer":
            raise IncompatibleKnobsError(
                f"{where}: has LoRA layers for {prefix} ({key}); fluxtune applies transformer LoRAs only: "
                "drop the text-encoder layers from the file")
        targets.setdefault(name, {})[rest.split(".")[0]] = tensor
    if not targets:
        raise IncompatibleKnobsError(f"{where}: no transformer LoRA layers found; is it a LoRA for another model?")
    rank = 0
    for name, parts in sorted(targets.items()):
        try:
            module = transformer.get_submodule(name)
        except AttributeError:
            raise IncompatibleKnobsError(
                f"{where}: targets transformer.{name}, which this {type(transformer).__name__} does not have; "
                "the LoRA was trained for another architecture") from None
        a, b = parts.get("A"), parts.get("B")
        base = getattr(module, "base_layer", module)  # a module that already carries a peft adapter
        if a is None or b is None or not isinstance(base, torch.nn.Linear):
            raise IncompatibleKnobsError(f"{where}: transformer.{name} needs lora_A and lora_B on a Linear layer")
        if a.shape[1] != base.in_features or b.shape[0] != base.out_features:
            raise IncompatibleKnobsError(
                f"{where}: transformer.{name} is {base.in_features}->{base.out_features} and the LoRA is "
                f"{a.shape[1]}->{b.shape[0]}; the LoRA was trained for another model size")
        rank = max(rank, int(a.shape[0]))
    return LoraFile(path=path, targets=frozenset(targets), rank=rank)


def load_lora(pipe: Any, lora: Lora, *, hotswap: bool = False) -> None:
    try:
        pipe.load_lora_weights(lora.path, adapter_name=lora.adapter_name, hotswap=hotswap)
    except Exception as e:  # peft/diffusers raise ValueError, RuntimeError, KeyError ... on a bad file
        raise IncompatibleKnobsError(
            f"loras: {lora.path}: loading failed: {type(e).__name__}: {str(e).splitlines()[0][:200]}") from e


def save_pristine(transformer: Any, state: LoraState) -> int:
    """Host copies of every plain Linear's weight and bias (what a later switch restores); returns bytes."""
    import torch

    total = 0
    for name, m in transformer.named_modules():
        if isinstance(m, torch.nn.Linear) and type(m.weight.data) is torch.Tensor and name not in state.pristine:
            w = m.weight.detach().to("cpu", copy=True)
            b = m.bias.detach().to("cpu", copy=True) if m.bias is not None else None
            state.pristine[name] = (w, b)
            total += w.numel() * w.element_size() + (b.numel() * b.element_size() if b is not None else 0)
    return total


def restore_pristine(transformer: Any, names: set[str], state: LoraState) -> None:
    """Put the pristine base weights back into ``names`` (plain tensors, on the module's device)."""
    import torch

    for name in sorted(names):
        m = transformer.get_submodule(name)
        w, b = state.pristine[name]
        device = m.weight.device
        m.weight = torch.nn.Parameter(w.to(device, copy=True), requires_grad=False)
        if b is not None:
            m.bias = torch.nn.Parameter(b.to(device, copy=True), requires_grad=False)


def fuse(pipe: Any, loras: tuple[Lora, ...]) -> None:
    """Load ``loras``, fuse them at their scales into the base weights and drop the adapters."""
    names = [lo.adapter_name for lo in loras]
    for lo in loras:
        load_lora(pipe, lo)
    pipe.set_adapters(names, [lo.scale for lo in loras])
    pipe.fuse_lora(components=["transformer"], lora_scale=1.0, adapter_names=names)
    pipe.unload_lora_weights()  # keeps the fused weights, removes the peft layers


def record_hotswap_base(transformer: Any, state: LoraState, slots: list[str]) -> None:
    """Remember the alpha/rank scaling of ``slots`` as just loaded (before any ``scale`` is applied)."""
    from peft.tuners.lora import LoraLayer

    for name, m in transformer.named_modules():
        if isinstance(m, LoraLayer):
            for slot in slots:
                if slot in m.scaling:
                    state.hotswap_base[(name, slot)] = float(m.scaling[slot])


def write_hotswap_scales(transformer: Any, state: LoraState, scales: dict[str, float]) -> None:
    """Set each hot-swap slot's scaling to alpha/rank x scale, in place in a 0-dim tensor.

    Compiled code reads a tensor scaling as an input but guards a float one as a constant, so the floats
    that ``set_adapters`` writes would recompile on every new scale (and they use the alpha and rank of
    the first file loaded into the slot, not of the LoRA swapped in).
    """
    import torch

    for (name, slot), base in state.hotswap_base.items():
        if slot not in scales:
            continue
        m = transformer.get_submodule(name)
        value = base * scales[slot]
        current = m.scaling.get(slot)
        if isinstance(current, torch.Tensor):
            current.fill_(value)
        else:
            m.scaling[slot] = torch.tensor(value, device=m.weight.device)


def set_adapter_weights(pipe: Any, loras: tuple[Lora, ...]) -> None:
    if loras:
        pipe.set_adapters([lo.adapter_name for lo in loras], [lo.scale for lo in loras])
    else:
        pipe.disable_lora()


@register
class LoraHandler(Handler):
    name = "loras"
    phase = LORA
    reversible = False

    def check(self, ctx: Context) -> list[str]:
        if not ctx.profile.loras:
            return []
        problems = []
        mode, _ = ctx.profile.lora_mode()
        for lo in ctx.profile.loras:
            try:
                info = inspect_lora(lo, ctx.pipe)
            except IncompatibleKnobsError as e:
                problems.append(str(e))
                continue
            if mode == "hotswap" and lo.max_rank is not None and info.rank > lo.max_rank:
                problems.append(f"loras: {lo.path}: rank {info.rank} exceeds max_rank={lo.max_rank}; "
                                f"declare max_rank>={info.rank}")
        return problems

    def apply(self, ctx: Context) -> None:
        loras = ctx.profile.loras
        if not loras:
            return
        import torch

        mode, why = ctx.profile.lora_mode()
        pipe, t = ctx.pipe, ctx.components()["transformer"]
        state = LoraState(mode=mode, loras=loras)
        infos = [inspect_lora(lo, pipe) for lo in loras]
        t0 = time.perf_counter()
        if mode == "fuse":
            kept = save_pristine(t, state)
            fuse(pipe, loras)
            state.fused_targets = set().union(*(i.targets for i in infos))
            detail = f"fused {len(loras)} LoRA(s) into {len(state.fused_targets)} layers; kept a pristine host copy " \
                     f"({kept / 2**20:.1f} MiB) for switching"
        else:
            if mode == "hotswap":
                declared = [lo.max_rank for lo in loras if lo.max_rank is not None]
                state.hotswap_rank = max(declared + [i.rank for i in infos])
                state.hotswap_targets = frozenset().union(*(i.targets for i in infos))
                pipe.enable_lora_hotswap(target_rank=state.hotswap_rank)
            for lo in loras:
                load_lora(pipe, lo)
                state.loaded[lo.adapter_name] = lo.path
            if mode == "hotswap":
                record_hotswap_base(t, state, list(state.loaded))
            set_adapter_weights(pipe, loras)
            if mode == "hotswap":
                write_hotswap_scales(t, state, {lo.adapter_name: lo.scale for lo in loras})
            detail = f"{len(loras)} peft adapter(s)" + (
                f", hot-swappable up to rank {state.hotswap_rank} on {len(state.hotswap_targets)} layers"
                if mode == "hotswap" else "")
        if ctx.on_gpu:
            torch.cuda.synchronize(ctx.device)
        set_lora_state(ctx.pipe, state)
        names = ", ".join(f"{lo.adapter_name}@{lo.scale:g}" for lo in loras)
        ctx.report.add(self.name, "transformer", f"{mode} ({why}): {names}: {detail}",
                       seconds=time.perf_counter() - t0)
