"""``fluxtune.load(model, profile)``: a pipeline read from its checkpoint straight to where the profile puts it.

``DiffusionPipeline.from_pretrained`` then ``apply`` holds the whole bf16 pipeline on the host first
(FLUX.1-dev: 34 GB, more than a 32 GB machine has) and quantizes it there. Here the modules are built on
the meta device (:func:`skeleton`), the profile is checked against the GPU and the host before a
byte is read, and ``apply``'s placement reads each block from the safetensors files onto the GPU,
quantizes it there and leaves it resident or copies it into its page-locked streaming arena
(:mod:`fluxtune.tuning.materialize`). Only what the profile keeps on the host is ever on the host.
"""

from __future__ import annotations

import importlib
import json
import re
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fluxtune.errors import BudgetExceededError, PipelineError

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline

    from fluxtune.hardware import HardwareInfo
    from fluxtune.profile import Profile

__all__ = ["host_check", "import_classes", "load", "local_directory", "materialize_pipeline", "skeleton"]


def local_directory(model: str) -> Path | None:
    """The save_pretrained directory behind ``model``: itself, or a hub id's cached snapshot (None for
    a built-in or something that is neither)."""
    from fluxtune import pipelines

    if model in pipelines.BUILTINS:
        return None
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if re.match(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$", model) and not path.exists():
        from diffusers import DiffusionPipeline

        try:
            return Path(DiffusionPipeline.download(model))
        except Exception as e:  # hub and network failures: one line, like pipelines.load
            raise PipelineError(f"hub model {model!r} could not be downloaded ({type(e).__name__}: "
                                f"{str(e).splitlines()[0] if str(e) else ''})") from e
    return None


def _keep_fp32(model: torch.nn.Module, dtype: torch.dtype, library: str) -> list[str]:
    """The module names ``from_pretrained`` would keep in float32 at ``dtype`` (its own rules)."""
    import torch

    if library == "diffusers":
        return list(getattr(model, "_keep_in_fp32_modules", None) or [])
    names: list[str] = []
    if dtype == torch.float16:
        names += list(getattr(model, "_keep_in_fp32_modules", None) or [])
    if dtype in (torch.float16, torch.bfloat16):
        names += list(getattr(model, "_keep_in_fp32_modules_strict", None) or [])
    return names


def _meta_module(library: str, cls_name: str, subdir: Path, dtype: torch.dtype) -> torch.nn.Module:
    """One model component built from its config on the meta device, in the dtype from_pretrained gives it."""
    import torch
    from accelerate import init_empty_weights

    cls = getattr(importlib.import_module(library), cls_name)
    # Buffers stay real (include_buffers=False): non-persistent ones (position ids, RoPE tables) are
    # computed at construction and are not in the checkpoint.
    with init_empty_weights(include_buffers=False):
        if library == "diffusers":
            model = cls.from_config(cls.load_config(subdir))
        else:
            model = cls(cls.config_class.from_pretrained(subdir))
    if hasattr(model, "tie_weights"):
        model.tie_weights()
    keep = _keep_fp32(model, dtype, library)
    for name, p in model.named_parameters():
        if p.is_floating_point():
            target = torch.float32 if any(k in name.split(".") for k in keep) else dtype
            p.data = p.data.to(target)
    for mod in model.modules():  # float buffers follow the dtype like from_pretrained's (not the integer ones)
        for bname, b in list(mod._buffers.items()):
            if b is not None and b.is_floating_point() and not b.is_meta:
                mod._buffers[bname] = b.to(dtype)
    model.eval()
    return model  # type: ignore[no-any-return]


def import_classes(model: str) -> float:
    """Import the pipeline's and its components' classes (diffusers and transformers import them lazily,
    and a first import of a FLUX pipeline's modules is seconds of Python); returns the seconds it took."""
    t0 = time.perf_counter()
    directory = local_directory(model)
    index_path = directory / "model_index.json" if directory is not None else None
    if index_path is None or not index_path.is_file():
        return 0.0
    index = json.loads(index_path.read_text())
    import diffusers

    getattr(diffusers, str(index.get("_class_name", "DiffusionPipeline")), None)
    for spec in index.values():
        if isinstance(spec, list) and len(spec) == 2 and spec[0] in ("diffusers", "transformers"):
            getattr(importlib.import_module(spec[0]), spec[1], None)
    return time.perf_counter() - t0


def skeleton(model: str, *, dtype: str = "bfloat16", variant: str | None = None) -> DiffusionPipeline:
    """The pipeline of a save_pretrained directory (or cached hub id) with its model components on the
    meta device, each carrying the checkpoint to read its weights from; tokenizers and scheduler are
    loaded as usual. ``fluxtune.apply`` reads the weights while it places them.

    Raises:
        PipelineError: not a directory with model_index.json and safetensors weights.
    """
    import torch
    from diffusers import DiffusionPipeline

    from fluxtune.loading.checkpoint import Checkpoint
    from fluxtune.pipelines import parse_dtype
    from fluxtune.tuning.materialize import WeightPlan
    from fluxtune.tuning.state import set_weight_plan

    directory = local_directory(model)
    if directory is None:
        raise PipelineError(f"model {model!r}: fluxtune.load reads a save_pretrained directory or a hub id; "
                            "for a built-in use fluxtune.pipelines.load and fluxtune.apply")
    index_path = directory / "model_index.json"
    if not index_path.is_file():
        raise PipelineError(f"model {model!r}: {directory} has no model_index.json; pass a save_pretrained directory")
    index = json.loads(index_path.read_text())
    torch_dtype = parse_dtype(dtype)
    modules: dict[str, torch.nn.Module] = {}
    for name, spec in index.items():
        if name.startswith("_") or not isinstance(spec, list) or len(spec) != 2 or spec[0] is None:
            continue
        library, cls_name = spec
        if library not in ("diffusers", "transformers"):
            continue
        cls = getattr(importlib.import_module(library), cls_name, None)
        if not (isinstance(cls, type) and issubclass(cls, torch.nn.Module)):
            continue
        sub = directory / name
        module = _meta_module(library, cls_name, sub, torch_dtype)
        source = Checkpoint(sub, variant)
        if library == "transformers":
            source.rename(_transformers_renamer(module, sub))
        set_weight_plan(module, WeightPlan(source=source))
        modules[name] = module
    try:
        pipe: Any = DiffusionPipeline.from_pretrained(directory, dtype=torch_dtype, local_files_only=True, **modules)
    except Exception as e:
        raise PipelineError(f"could not load the pipeline of {directory} ({type(e).__name__}: "
                            f"{str(e).splitlines()[0] if str(e) else ''})") from e
    pipe.set_progress_bar_config(disable=True)
    return pipe  # type: ignore[no-any-return]


def host_check(profile: Profile, pipe: Any, hardware: HardwareInfo) -> str | None:
    """A one-line refusal when ``profile`` on this skeleton needs more host memory than ``budget.host_ram``
    (default: the machine's memory less a margin), else None. Nothing has been read yet."""
    from fluxtune.memory import ModelFacts, check_host_ram, default_host_budget, predict

    facts = ModelFacts.from_pipeline(pipe)
    prediction = predict(profile, facts)
    budget = profile.budget.host_ram or (default_host_budget(hardware.host_ram_bytes) if hardware.host_ram_bytes
                                         else None)
    return check_host_ram(prediction, budget)


def load(
    model: str,
    profile: Profile | str | Path | dict[str, Any],
    *,
    overrides: Sequence[str] = (),
    loras: Sequence[Any] | None = None,
    hardware: HardwareInfo | None = None,
    device: str | None = None,
    strict: bool = False,
    dtype: str = "bfloat16",
    variant: str | None = None,
) -> DiffusionPipeline:
    """Load ``model`` and make it obey ``profile`` in one pass: no full host copy of the weights.

    Args:
        model: a save_pretrained directory, a hub id (read from the local cache), or a built-in name
            (built as usual, then applied).
        profile: a Profile, a YAML path, a preset name, or plain data.
        overrides: dotted ``KEY=VALUE`` overrides of the profile.
        loras: as for :func:`fluxtune.apply` (LoRAs need the plain weights: those components are read
            whole onto the host first).
        hardware: the machine (detected when None).
        device: the execution device (default: the detected GPU, else CPU).
        strict: turn every skipped knob into an error.
        dtype: the dtype the weights are read into (the profile's component dtypes still apply).
        variant: the checkpoint variant (``fp16`` files), as for ``from_pretrained``.

    Returns:
        The tuned pipeline; ``fluxtune.last_report(pipe)`` says what was done.

    Raises:
        PipelineError, ProfileError, IncompatibleKnobsError, UnsupportedHardwareError: as ``apply``.
        BudgetExceededError: the profile needs more host memory than ``budget.host_ram``, or more GPU
            memory than its budget (checked before any weight is read).
    """
    import torch

    from fluxtune import pipelines
    from fluxtune.hardware import detect_hardware
    from fluxtune.presets import load_profile
    from fluxtune.tuning import Action, apply, execution_device, preload, resolve

    hw = hardware if hardware is not None else detect_hardware()
    prof = load_profile(profile)
    if model in pipelines.BUILTINS:
        pipe: Any = pipelines.load(model, dtype=dtype)
        apply(prof, pipe, overrides=overrides, hardware=hw, device=device, strict=strict, loras=loras, model=model)
        return pipe
    t0 = time.perf_counter()
    library_s = import_classes(model)
    pipe = skeleton(model, dtype=dtype, variant=variant)
    skeleton_s = time.perf_counter() - t0 - library_s
    dev = execution_device(hw, device)
    resolved, _ = resolve(prof, hw, dev)
    if overrides:
        resolved = load_profile(resolved, overrides)
    refusal = host_check(resolved, pipe, hw)
    if refusal is not None:
        raise BudgetExceededError(f"profile {resolved.name!r} on {model}: {refusal}")
    if loras if loras is not None else resolved.loras:
        from fluxtune.tuning.materialize import materialize
        from fluxtune.tuning.state import set_weight_plan, weight_plan

        for module in pipelines.module_components(pipe).values():
            plan = weight_plan(module)
            if plan is not None:  # peft needs real weights to attach or fuse LoRAs to
                materialize(module, plan, torch.device("cpu"), on_cuda=False)
                set_weight_plan(module, None)
    _materialize_unaddressed(pipe)
    t0 = time.perf_counter()
    imports_s = preload(resolved)  # torchao, TorchDynamo: once per process, reported apart
    report = apply(prof, pipe, overrides=overrides, hardware=hw, device=device, strict=strict, loras=loras,
                   model=model)
    report.actions.insert(0, Action("load", "pipeline", "applied", (
        f"skeleton of {local_directory(model)} on the meta device in {skeleton_s:.1f}s (configs, tokenizers, "
        f"scheduler; the weights are read block by block while placing); imports {library_s + imports_s:.1f}s "
        f"(the pipeline's classes, torchao, TorchDynamo: once per process); apply "
        f"{time.perf_counter() - t0 - imports_s:.1f}s"), skeleton_s + library_s))
    return pipe  # type: ignore[no-any-return]


def materialize_pipeline(pipe: Any, device: torch.device) -> None:
    """Every component of ``pipe`` real and whole on ``device`` (a skeleton's weights read from its checkpoint)."""
    from fluxtune import pipelines
    from fluxtune.tuning.materialize import materialize
    from fluxtune.tuning.state import set_weight_plan, weight_plan

    for module in pipelines.module_components(pipe).values():
        plan = weight_plan(module)
        if plan is not None:
            materialize(module, plan, device, on_cuda=device.type == "cuda")
            set_weight_plan(module, None)
    pipe.to(device)


def _materialize_unaddressed(pipe: Any) -> None:
    """Components no profile section addresses (an image encoder, ...) are read onto the host as
    from_pretrained would have: nothing else would ever give them weights."""
    import torch

    from fluxtune import pipelines
    from fluxtune.profile import COMPONENTS
    from fluxtune.tuning.materialize import materialize
    from fluxtune.tuning.state import set_weight_plan, weight_plan

    for name, module in pipelines.module_components(pipe).items():
        plan = weight_plan(module)
        if name not in COMPONENTS and plan is not None:
            materialize(module, plan, torch.device("cpu"), on_cuda=False)
            set_weight_plan(module, None)


def _transformers_renamer(module: Any, where: Path) -> Callable[[str], str]:
    """Stored key -> module key for a transformers model whose checkpoint keeps an older layout
    (Qwen2.5-VL saves ``model.layers.*`` for its ``model.language_model.layers.*``, Mistral-3
    ``language_model.model.*``): transformers' own renaming rules, each applied in turn to the result of
    the previous ones, as transformers does. A rule that converts tensors (merging experts, splitting
    projections) is refused: reading it would need that conversion."""
    from transformers.conversion_mapping import WeightRenaming, get_model_conversion_mapping

    rules = get_model_conversion_mapping(module)

    def rename(key: str) -> str:
        for rule in rules:
            new, matched = rule.rename_source_key(key)
            if matched is None:
                continue
            if not isinstance(rule, WeightRenaming):
                raise PipelineError(
                    f"{where}: tensor {key!r} needs transformers' {type(rule).__name__} conversion, which "
                    "fluxtune.load does not do; load the pipeline with DiffusionPipeline.from_pretrained and "
                    "use fluxtune.apply(profile, pipe)")
            key = str(new)
        return key

    return rename
