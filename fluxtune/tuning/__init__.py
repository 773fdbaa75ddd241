"""``apply(profile, pipe)``: make a loaded diffusers pipeline obey a profile (one handler module per knob).

The package is not called ``apply`` so that importing it never shadows ``fluxtune.apply()``.

The whole profile is checked against the pipeline and the machine first; only then are the knobs
applied, one handler each, in the phase order of :mod:`fluxtune.tuning.base`. A second profile on an
already-tuned pipeline reverts the reversible knobs (offload, cache, attention, VAE, budget, call
defaults) and re-applies them; the irreversible ones (precision, fused QKV, quantization, layerwise
casting, compile) must match, or the call refuses before changing anything.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from fluxtune.errors import IncompatibleKnobsError, PipelineError, UnsupportedHardwareError
from fluxtune.hardware import HardwareInfo, detect_hardware
from fluxtune.profile import COMPONENTS, Profile
from fluxtune.tuning import (  # noqa: F401  (importing registers the handlers)
    attention,
    budget,
    cache,
    cfg_batch,
    compile,
    fuse,
    generation,
    layerwise,
    lora,
    matmul,
    modcache,
    placement,
    precision,
    quantize,
    regional,
    vae,
)
from fluxtune.tuning.base import HANDLERS, IRREVERSIBLE, Context
from fluxtune.tuning.generation import CallState
from fluxtune.tuning.report import Action, ApplyReport
from fluxtune.tuning.state import (
    broken_reason,
    call_state,
    discard,
    is_tuned,
    mark_broken,
    reset,
    set_call_state,
)

__all__ = ["Action", "ApplyReport", "apply", "check_hardware", "discard", "execution_device", "irreversible_signature", "is_tuned", "preload",
           "reset", "resolve"]


def _lazy_imports(profile: Profile) -> list[str]:
    """The modules this profile's handlers import on first use (lazy, so ``import fluxtune`` stays light)."""
    from fluxtune.knobs import GroupOffload, ModelOffload, SequentialOffload

    names: list[str] = []
    parts = [profile.component(n) for n in COMPONENTS]
    if any(c.quantize is not None for c in parts):
        names.append("torchao.quantization")
    if profile.compile.enabled:
        names += ["torch._dynamo", "torch._inductor.config", "torch._inductor.compile_fx"]  # the last: 1.1 s
    if any(isinstance(c.offload, ModelOffload | SequentialOffload) for c in parts):
        names.append("accelerate.hooks")
    if any(isinstance(c.offload, GroupOffload) for c in parts):
        names.append("diffusers.hooks")
    if profile.attention.backend != "native":
        names.append("diffusers.models.attention_dispatch")
    return names


def preload(profile: Profile) -> float:
    """Import what ``apply(profile, ...)`` will import on first use; returns the seconds it took.

    A process pays these imports once (torchao and TorchDynamo mostly: about 1.5 s on the H200
    machine), so measuring workers call this before timing ``apply`` and report the imports apart.
    """
    import contextlib
    import importlib
    import time

    t0 = time.perf_counter()
    for name in _lazy_imports(profile):
        # An optional backend missing here: the handler that needs it says so when it runs.
        with contextlib.suppress(ImportError):
            importlib.import_module(name)
    return time.perf_counter() - t0


def _import_beside(profile: Profile) -> Any:
    """Start :func:`preload`'s imports on a thread (``None`` when they are all done already)."""
    import sys
    import threading

    if all(name in sys.modules for name in _lazy_imports(profile)):
        return None
    thread = threading.Thread(target=preload, args=(profile,), name="fluxtune-imports", daemon=True)
    thread.start()
    return thread


def irreversible_signature(profile: Profile) -> dict[str, Any]:
    """The parts of a profile that change weights or code in place (must match on re-apply)."""
    sig: dict[str, Any] = {}
    for name in COMPONENTS:
        c = profile.component(name)
        sig[f"{name}.dtype"] = c.dtype
        sig[f"{name}.quantize"] = c.quantize.model_dump() if c.quantize else None
        sig[f"{name}.layerwise_casting"] = c.layerwise_casting.model_dump() if c.layerwise_casting else None
    sig["modulation"] = profile.modulation.model_dump()
    sig["compile"] = profile.compile.model_dump()
    return sig


def execution_device(hardware: HardwareInfo, device: str | None) -> Any:
    """The device a profile runs on: ``device`` if given, else the detected GPU, else the CPU."""
    import torch

    if device is not None:
        return torch.device(device)
    if hardware.has_cuda and torch.cuda.is_available():
        return torch.device("cuda", hardware.gpu_index or 0)
    return torch.device("cpu")


def _check_machine(profile: Profile, hardware: HardwareInfo, device: Any) -> None:
    if device.type != "cuda":
        field = profile.needs_gpu()
        if field is not None:
            raise UnsupportedHardwareError(
                f"{field} needs a CUDA GPU and this run is on {device} ({hardware.describe()}); "
                "on CPU use offload none, bf16/float32 and int8 quantization"
            )
        return
    from fluxtune.gpus import class_allows, class_description

    cls, cc = hardware.capability, hardware.compute_capability
    if cls is None or cc is None:
        return
    for name in COMPONENTS:
        q = profile.component(name).quantize
        if q is not None and not class_allows(cls, q.method, q.granularity):
            fix = ("use int8_dynamic or int8_weight (fp8 is storage only here: layerwise_casting)" if cls == "ampere"
                   else "use granularity=tensor")
            variant = f" (variant {profile.variant!r})" if profile.variant else ""
            raise UnsupportedHardwareError(
                f"{name}.quantize.method={q.method}"
                + (f" granularity={q.granularity}" if q.method == "fp8_dynamic" else "")
                + f"{variant} does not run on "
                f"{hardware.gpu_name}, SM {cc[0]}.{cc[1]} ({class_description(cls)}): {fix}"
            )


def resolve(profile: Profile, hardware: HardwareInfo, device: Any) -> tuple[Profile, str | None]:
    """The variant of ``profile`` for this GPU's capability class, and a line saying which and why.

    Returns:
        (profile to apply, report line or None when the profile has no variants).
    """
    if not profile.variants:
        return profile, None
    cls = hardware.capability if device.type == "cuda" else None
    resolved = profile.for_class(cls)
    where = (f"{hardware.gpu_name}, SM {hardware.compute_capability[0]}.{hardware.compute_capability[1]}, "  # type: ignore[index]
             f"class {cls}" if cls is not None else f"no GPU class on {device}")
    text = f"variant {resolved.variant!r} for {where}"
    v = next((v for v in profile.variants if v.name == resolved.variant), None)
    if v is not None and v.description:
        text += f": {v.description}"
    if hardware.emulated_on:
        text += f" (emulated on {hardware.emulated_on})"
    return resolved, text


def check_hardware(profile: Profile | str | Path | dict[str, Any], hardware: HardwareInfo,
                   device: str | None = None) -> Profile:
    """Everything ``apply`` checks about the machine, without a pipeline: the variant for this GPU, the
    knobs its capability class can run, and a budget the card can hold.

    Returns:
        The resolved profile (the variant that would run).

    Raises:
        UnsupportedHardwareError: a knob does not run on this GPU, or the budget is more than it has.
    """
    import torch

    from fluxtune.presets import load_profile

    # The hardware described, not this process's torch: a test may describe a card this machine lacks.
    dev = torch.device(device) if device else torch.device("cuda", hardware.gpu_index or 0) if hardware.has_cuda \
        else torch.device("cpu")
    prof, _ = resolve(load_profile(profile), hardware, dev)
    _check_machine(prof, hardware, dev)
    total, vram = hardware.total_memory_bytes, prof.budget.vram
    if dev.type == "cuda" and vram is not None and prof.budget.enforce and total is not None and vram > total:
        raise UnsupportedHardwareError(
            f"budget.vram={vram / 1e9:g}GB is more than the {hardware.gpu_name} has ({total / 2**30:.1f} GiB): "
            "use the preset of a smaller tier or lower budget.vram")
    return prof


def _check_pipeline(pipe: Any) -> None:
    """Refuse anything that is not a diffusers pipeline with a transformer before touching it."""
    from diffusers import DiffusionPipeline

    if not isinstance(pipe, DiffusionPipeline):
        raise PipelineError(
            f"pipe: a {type(pipe).__module__}.{type(pipe).__qualname__} is not a diffusers pipeline; pass what "
            "fluxtune.pipelines.load() or DiffusionPipeline.from_pretrained() returns"
        )
    import torch

    if not isinstance(getattr(pipe, "transformer", None), torch.nn.Module):
        raise PipelineError(
            f"pipe: {type(pipe).__name__} has no transformer; fluxtune tunes transformer pipelines (FLUX, DiT)"
        )
    # The mark sits on the components whose weights a failed apply changed: replacing them (a reload,
    # or the search worker's pristine copies) clears it.
    broken = broken_reason(pipe)
    if broken:
        raise IncompatibleKnobsError(
            f"this pipeline was left changed by a failed apply ({broken}); reload it (fluxtune.pipelines.load) "
            "and apply again"
        )


def _strict_skips(ctx: Context) -> list[str]:
    """What the handlers would skip on this pipeline/machine: with ``strict=True`` these fail before
    anything is changed (a skip found half-way would leave weights quantized and the profile unapplied)."""
    b = ctx.profile.budget
    out = []
    if b.vram is not None and b.enforce and not ctx.on_gpu:
        out.append("pipeline: budget skipped: no CUDA device: a VRAM cap has nothing to hold (strict=True); "
                   "run on a GPU or set budget.enforce=false")
    if ctx.profile.compile.enabled and ctx.on_gpu and not ctx.hardware.can_compile:
        out.append("transformer: compile skipped: Triton is not installed (strict=True); pip install triton "
                   "(triton-windows on Windows) or set compile.mode=off")
    return out


def _warn_travel(profile: Profile, pipe: Any, model: str | None, hardware: HardwareInfo, report: ApplyReport) -> None:
    """Warn when a profile's measured block comes from another model or GPU: what was not validated."""
    import warnings

    from fluxtune.errors import FluxtuneWarning

    m = profile.measured
    if m is None or m.status != "measured":
        return
    notes = []
    name = model or getattr(getattr(pipe, "config", None), "_name_or_path", None) or ""
    if m.model and name and str(m.model) != str(name) and Path(str(m.model)).name != Path(str(name)).name:
        notes.append(f"measured on model {m.model!r}, applied to {name!r}: its latency, peak memory and quality "
                     "figures do not hold for this model")
    # A measured block with a hardware record but no GPU name was measured on the CPU.
    measured_gpu = ((m.hardware or {}).get("name") or "cpu") if isinstance(m.hardware, dict) and m.hardware else None
    here = hardware.gpu_name or "cpu"
    if measured_gpu and measured_gpu != here:
        notes.append(f"measured on {measured_gpu}, applied on {here}: the budget fit and the speed were not "
                     f"validated here (run fluxtune bench or search on this machine)")
    for note in notes:
        text = f"profile {profile.name!r}: {note}"
        report.warnings.append(text)
        warnings.warn(text, FluxtuneWarning, stacklevel=3)


def _check_family(profile: Profile, family: str, pipe: Any) -> None:
    if profile.family != "any" and profile.family != family:
        raise IncompatibleKnobsError(
            f"family={profile.family}: profile {profile.name!r} is for {profile.family} pipelines and this is a "
            f"{type(pipe).__name__}; use a {family} profile or set family=any"
        )


def apply(
    profile: Profile | str | Path | dict[str, Any],
    pipe: Any,
    *,
    overrides: Sequence[str] = (),
    hardware: HardwareInfo | None = None,
    device: str | None = None,
    strict: bool = False,
    loras: Sequence[Any] | None = None,
    model: str | None = None,
    on_knob: Callable[[str], None] | None = None,
) -> ApplyReport:
    """Make ``pipe`` obey ``profile``.

    Args:
        profile: a Profile, a YAML path, a preset name, or plain data.
        pipe: a loaded diffusers pipeline (FluxPipeline, DiTPipeline, or another transformer pipeline).
        overrides: dotted ``KEY=VALUE`` overrides of the profile.
        hardware: the machine (detected when None); passed in so nothing deep inside looks it up.
        device: the execution device (default: the detected GPU, else CPU).
        strict: turn every skipped knob into an error.
        loras: LoRAs (paths, dicts or :class:`fluxtune.knobs.Lora`) replacing the profile's ``loras``.
        model: the model spec the pipeline was loaded from, to warn when the profile was measured on
            another (default: the pipeline's ``_name_or_path``).
        on_knob: called with each knob's name (``quantize``, ``offload``, ...) as it starts: a worker tells
            its parent which part of a long apply it is in.

    Returns:
        What was done to each component, in order, with reasons for anything skipped.

    Raises:
        PipelineError: ``pipe`` is not a diffusers transformer pipeline (checked before anything else).
        ProfileError: the profile is malformed.
        IncompatibleKnobsError: a knob does not exist on this pipeline or knobs do not combine.
        UnsupportedHardwareError: the profile needs a GPU or an architecture this machine lacks.
        BudgetExceededError: the placed weights alone exceed ``budget.vram``.
    """
    from fluxtune.pipelines import family as pipeline_family
    from fluxtune.presets import load_profile

    _check_pipeline(pipe)
    hw = hardware if hardware is not None else detect_hardware()
    dev = execution_device(hw, device)
    # The variant for this GPU first, then the caller's overrides on top of it (the caller's word wins).
    prof, variant_line = resolve(load_profile(profile), hw, dev)
    if overrides:
        prof = load_profile(prof, overrides)
    if loras is not None:
        prof = prof.replace(loras=[lo.model_dump() if hasattr(lo, "model_dump") else lo for lo in loras])
    fam = pipeline_family(pipe)
    _check_family(prof, fam, pipe)
    _check_machine(prof, hw, dev)

    previous: CallState | None = call_state(pipe)
    if previous is not None:
        if previous.profile.loras != prof.loras:
            raise IncompatibleKnobsError(
                "this pipeline is already tuned and loras differ from the ones applied; switch LoRAs with "
                "fluxtune.set_loras(pipe, loras), or reload the pipeline before applying this profile"
            )
        old, new = irreversible_signature(previous.profile), irreversible_signature(prof)
        changed = [k for k in new if old[k] != new[k]]
        if changed:
            raise IncompatibleKnobsError(
                f"this pipeline is already tuned by profile {previous.profile.name!r}, and "
                f"{', '.join(changed)} cannot be changed in place (weights were cast, quantized or compiled); "
                "reload the pipeline (fluxtune.pipelines.load) before applying this profile"
            )

    ctx = Context(pipe=pipe, profile=prof, hardware=hw, device=dev, family=fam,
                  report=ApplyReport(profile=prof.name, device=str(dev)), strict=strict)
    if variant_line is not None:
        ctx.report.add("variant", "pipeline", variant_line)
    problems = [p for h in HANDLERS for p in h.check(ctx)]
    if strict:
        problems += _strict_skips(ctx)
    if problems:
        raise IncompatibleKnobsError("; ".join(problems))

    handlers = HANDLERS
    if previous is not None:
        for _, undo in reversed(previous.undo):
            undo()
        handlers = [h for h in HANDLERS if h.reversible]
        kept = [h.name for h in HANDLERS if not h.reversible and h.name in IRREVERSIBLE]
        ctx.report.add("reapply", "pipeline", f"reverted the previous reversible knobs; kept {', '.join(kept)}")
        # undo callbacks of irreversible knobs do not exist, so nothing else carries over.
    done: list[str] = []
    # The GPU's first apply in a process imports torchao and TorchDynamo on a thread beside placement,
    # which mostly waits on copies (2-3 s of apply on the H200 host when paid in line).
    importing = _import_beside(prof) if dev.type == "cuda" else None
    try:
        for handler in handlers:
            if on_knob is not None:
                on_knob(handler.name)
            handler.apply(ctx)
            done.append(handler.name)
    except BaseException as e:
        _roll_back(ctx, previous, done, e)
        raise
    finally:
        if importing is not None:
            importing.join()
    set_call_state(pipe, CallState(ctx))
    _warn_travel(prof, pipe, model, hw, ctx.report)
    return ctx.report


def _roll_back(ctx: Context, previous: CallState | None, done: list[str], error: BaseException) -> None:
    """A handler failed half-way: revert the reversible knobs this call installed, then put the previous
    profile's reversible knobs back (re-apply), so the pipeline's state describes what it runs. A pipeline
    whose weights this call already changed (cast, quantized, compiled) is marked broken instead."""
    import contextlib

    for _, undo in reversed(ctx.undo):
        with contextlib.suppress(Exception):
            undo()
    irreversible = [n for n in done if n in IRREVERSIBLE]
    if previous is None:
        if irreversible:
            _mark_broken(ctx, f"{', '.join(irreversible)} ran before {type(error).__name__}: "
                              f"{str(error).splitlines()[0] if str(error) else ''}")
        return
    back = Context(pipe=ctx.pipe, profile=previous.profile, hardware=ctx.hardware, device=ctx.device,
                   family=ctx.family, report=previous.report, strict=False)
    try:
        for handler in (h for h in HANDLERS if h.reversible):
            handler.apply(back)
        set_call_state(ctx.pipe, CallState(back))
    except Exception:
        for _, undo in reversed(back.undo):
            with contextlib.suppress(Exception):
                undo()
        reset(ctx.pipe)  # the pipeline's own class and no fluxtune state: it runs as it is
        _mark_broken(ctx, f"restoring profile {previous.profile.name!r} after {type(error).__name__} failed")


def _mark_broken(ctx: Context, reason: str) -> None:
    for module in ctx.components().values():
        mark_broken(module, reason)
