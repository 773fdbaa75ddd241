"""``set_loras(pipe, loras)``: switch the LoRAs of an already-tuned pipeline, keeping every other knob."""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from fluxtune.errors import IncompatibleKnobsError, ProfileError
from fluxtune.knobs import GroupOffload, Lora, PartialResidency, SequentialOffload
from fluxtune.tuning.report import ApplyReport

__all__ = ["set_loras"]


def _as_loras(loras: Sequence[Any]) -> tuple[Lora, ...]:
    from fluxtune.profile import validate_profile

    items = [lo.model_dump() if isinstance(lo, Lora) else lo for lo in loras]
    return validate_profile({"loras": items}, source="set_loras").loras


def set_loras(pipe: Any, loras: Sequence[Lora | str | dict[str, Any]]) -> ApplyReport:
    """Replace the LoRAs of a pipeline tuned by :func:`fluxtune.apply`, keeping every other knob.

    Fuse mode restores the pristine base weights from the host copy (never from quantized weights),
    fuses the new set and re-quantizes with the profile's quantize config; adapter mode loads and
    activates adapters (already-loaded ones are reused); hotswap mode swaps weights into the existing
    adapters without recompiling.

    Args:
        pipe: a pipeline ``apply`` has tuned.
        loras: the new LoRAs (paths, dicts or :class:`Lora`); empty removes them all.

    Returns:
        The report of what was switched.

    Raises:
        ProfileError: a LoRA entry is malformed (e.g. not .safetensors).
        IncompatibleKnobsError: a LoRA does not fit the pipeline or its mode; the pipeline is unchanged.
    """
    from fluxtune.tuning import state as tuned
    from fluxtune.tuning.lora import LoraState, inspect_lora

    call_state = tuned.call_state(pipe)
    if call_state is None:
        raise IncompatibleKnobsError("set_loras: this pipeline is not tuned; run fluxtune.apply(profile, pipe, "
                                     "loras=[...]) first")
    new = _as_loras(loras)
    profile = call_state.profile
    state: LoraState | None = tuned.lora_state(pipe)
    mode = state.mode if state is not None else profile.replace(loras=[lo.model_dump() for lo in new]).lora_mode()[0]
    wrong = [lo for lo in new if lo.mode not in ("auto", mode)]
    if wrong:
        raise IncompatibleKnobsError(f"set_loras: {wrong[0].path}: mode={wrong[0].mode}, but this pipeline applies "
                                     f"LoRAs as {mode}; use mode={mode} or auto (or reload the pipeline)")
    try:
        new_profile = profile.replace(loras=[lo.model_dump() for lo in new])
    except ProfileError as e:
        raise IncompatibleKnobsError(f"set_loras: {e}") from None
    offload = profile.transformer.offload
    if isinstance(offload, GroupOffload | PartialResidency | SequentialOffload):
        raise IncompatibleKnobsError(
            f"set_loras: transformer.offload.mode={offload.mode} keeps its own copies of the weights; reload the "
            "pipeline and apply the profile with the new loras")
    if state is not None and state.mode == "fuse" and profile.transformer.layerwise_casting is not None:
        raise IncompatibleKnobsError("set_loras: fused LoRAs on a layerwise-cast transformer cannot be switched "
                                     "(the fp8 storage cannot be redone in place); reload the pipeline")
    infos = [inspect_lora(lo, pipe) for lo in new]  # every check before anything changes
    if mode == "hotswap":
        _check_hotswap(state, new, infos)

    report = ApplyReport(profile=profile.name, device=str(getattr(pipe, "device", "?")))
    t0 = time.perf_counter()
    if state is None:
        state = LoraState(mode=mode)
    if mode == "fuse":
        detail = _switch_fused(pipe, profile, state, new, infos)
    elif mode == "hotswap":
        detail = _switch_hotswap(pipe, state, new)
    else:
        detail = _switch_adapters(pipe, state, new)
    state.loras = new
    tuned.set_lora_state(pipe, state)
    call_state.profile = new_profile
    names = ", ".join(f"{lo.adapter_name}@{lo.scale:g}" for lo in new) or "none"
    report.add("loras", "transformer", f"{mode}: {names}: {detail}", seconds=time.perf_counter() - t0)
    return report


def _check_hotswap(state: Any, new: tuple[Lora, ...], infos: list[Any]) -> None:
    if state is None or not state.loaded:
        raise IncompatibleKnobsError("set_loras: hotswap needs LoRAs loaded by apply (the hot-swap slots); "
                                     "apply the profile with loras first")
    if len(new) != len(state.loaded):
        raise IncompatibleKnobsError(f"set_loras: {len(new)} LoRA(s) for {len(state.loaded)} hot-swap slot(s); "
                                     "hotswap replaces LoRAs one for one, reload the pipeline to change the count")
    for lo, info in zip(new, infos, strict=True):
        if info.rank > state.hotswap_rank:
            raise IncompatibleKnobsError(f"set_loras: {lo.path}: rank {info.rank} exceeds the declared hot-swap "
                                         f"max_rank={state.hotswap_rank}; declare max_rank>={info.rank} in apply")
        extra = sorted(info.targets - state.hotswap_targets)
        if extra:
            raise IncompatibleKnobsError(f"set_loras: {lo.path}: targets transformer.{extra[0]}, which the hot-swap "
                                         "slots do not cover; swap in LoRAs targeting the same layers")


def _switch_fused(pipe: Any, profile: Any, state: Any, new: tuple[Lora, ...], infos: list[Any]) -> str:
    import torch

    from fluxtune.tuning.lora import fuse, restore_pristine

    t = pipe.transformer
    targets: set[str] = set().union(*(i.targets for i in infos)) if infos else set()
    restore = state.fused_targets | targets
    missing = sorted(restore - set(state.pristine))
    if missing:
        raise IncompatibleKnobsError(f"set_loras: no pristine copy of transformer.{missing[0]} (it was not a plain "
                                     "Linear when the LoRAs were first fused); reload the pipeline")
    restore_pristine(t, restore, state)
    try:
        if new:
            fuse(pipe, new)
    except IncompatibleKnobsError:
        restore_pristine(t, restore, state)
        raise
    state.fused_targets = targets
    q = profile.transformer.quantize
    if q is None:
        return f"restored {len(restore)} layers from the pristine copy, fused {len(new)} LoRA(s)"
    from fluxtune.tuning.quantize import quantize_module

    on_cuda = t.device.type == "cuda"
    quantize_module(t, q, on_cuda=on_cuda, device=t.device if on_cuda else None, only=restore.__contains__)
    if t.device.type == "cuda":
        torch.cuda.synchronize(t.device)
    return (f"restored {len(restore)} layers from the pristine copy, fused {len(new)} LoRA(s), "
            f"re-quantized them ({q.method})")


def _switch_adapters(pipe: Any, state: Any, new: tuple[Lora, ...]) -> str:
    from fluxtune.tuning.lora import load_lora, set_adapter_weights

    loaded = 0
    for lo in new:
        if state.loaded.get(lo.adapter_name) == lo.path:
            continue  # already in memory: switching back costs no disk read
        if lo.adapter_name in state.loaded:
            pipe.delete_adapters([lo.adapter_name])
            del state.loaded[lo.adapter_name]
        load_lora(pipe, lo)
        state.loaded[lo.adapter_name] = lo.path
        loaded += 1
    set_adapter_weights(pipe, new)
    return f"{loaded} adapter(s) loaded, {len(new)} active, {len(state.loaded)} in memory"


def _switch_hotswap(pipe: Any, state: Any, new: tuple[Lora, ...]) -> str:
    from fluxtune.tuning.lora import load_lora, record_hotswap_base, write_hotswap_scales

    t = pipe.transformer
    slots = list(state.loaded)
    swapped = 0
    for slot, lo in zip(slots, new, strict=True):
        if state.loaded[slot] != lo.path:
            # peft writes the new file's alpha/rank into the scaling only where it differs from the current
            # value: put the old file's back first so the slot ends up holding exactly the new one's.
            write_hotswap_scales(t, state, {slot: 1.0})
            load_lora(pipe, lo.model_copy(update={"adapter_name": slot}), hotswap=True)
            record_hotswap_base(t, state, [slot])
            state.loaded[slot] = lo.path
            swapped += 1
    # Not set_adapters: it would write float scalings (recompiling) from the first file's alpha and rank.
    write_hotswap_scales(t, state, {slot: lo.scale for slot, lo in zip(slots, new, strict=True)})
    return f"hot-swapped {swapped} adapter(s) without recompiling"
