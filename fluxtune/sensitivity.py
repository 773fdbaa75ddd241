"""Per-layer quantization sensitivity: which groups of Linear layers should stay in higher precision.

A scan quantizes one group of layers at a time (attention projections, MLP, AdaLN modulation,
embedders, final layer; per block), renders fixed class labels and seeds, and measures the error
against the unquantized model's images (PSNR, SSIM, relative MSE). Groups are ranked most
sensitive first; :meth:`SensitivityResult.exclude_patterns` gives the regexes of the top ``n``,
ready for ``Quantize.exclude`` (``transformer.quantize.exclude`` in a profile).

What a scan is: a one-group-at-a-time ablation with the error measured on the final images of a
fixed workload. What it is not: a measure of interactions (two groups quantized together can do
more harm than the sum of each alone), nor a distribution-level quality measure (FID); it ranks
layers for the workload it saw.

:func:`proxy_scan` is the cheap variant: one transformer forward with hooks on every Linear, each
layer's weight quantized alone, relative error of that layer's output on the captured inputs.
It needs no denoising loop but ignores how errors propagate through the network.
"""

from __future__ import annotations

import copy
import json
import re
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from fluxtune.errors import PipelineError, ProfileError, UnsupportedHardwareError
from fluxtune.knobs import Quantize

__all__ = [
    "METHODS",
    "GroupScore",
    "SensitivityResult",
    "layer_groups",
    "proxy_scan",
    "render",
    "scan",
]

METHODS = ("int8_weight", "int8_dynamic", "fp8_dynamic")

_BLOCK = re.compile(r"^((?:single_)?transformer_blocks)\.(\d+)\.(.+)$")
# (kind, pattern on a Linear's name inside a block); the first match wins. DiT uses attn1/ff/norm1
# (AdaLayerNormZero, with its own timestep/class embedder at norm1.emb); FLUX double blocks add
# the context stream (add_*_proj, to_add_out, ff_context, norm1_context); single blocks have
# norm.linear, proj_mlp and proj_out (proj_out mixes the attention and MLP streams: kept with MLP).
# FLUX.2 names its streams the same way (its modulation is shared, outside the blocks; a single block
# fuses q/k/v and the MLP input in attn.to_qkv_mlp_proj, counted with attention); Qwen-Image names them
# img_*/txt_* (img_mod/txt_mod are its per-block modulation).
_BLOCK_KINDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("embed", re.compile(r"^norm1\.emb\.")),
    ("attn_context", re.compile(r"^attn\.(?:add_q_proj|add_k_proj|add_v_proj|to_add_out)$")),
    ("attn", re.compile(r"^attn1?\.(?:to_q|to_k|to_v|to_out\.0|to_out|to_qkv_mlp_proj)$")),
    ("mlp_context", re.compile(r"^(?:ff_context|txt_mlp)\.")),
    ("mlp", re.compile(r"^(?:ff\.|img_mlp\.|proj_mlp$|proj_out$)")),
    ("adaln_context", re.compile(r"^(?:norm1_context\.linear|txt_mod\.\d+)$")),
    ("adaln", re.compile(r"^(?:norm1?\.linear|img_mod\.\d+)$")),
)
_TOP_KINDS: tuple[tuple[str, re.Pattern[str]], ...] = (
    ("final", re.compile(r"^(?:proj_out(?:_\d+)?|norm_out\.linear)$")),
    ("embed", re.compile(r"^(?:pos_embed|time_text_embed|time_guidance_embed|context_embedder|x_embedder|"
                         r"adaln_single|img_in|txt_in)")),
    # FLUX.2 modulates every block from these shared layers.
    ("adaln", re.compile(r"^(?:double|single)_stream_modulation")),
)


def _linear_names(module: torch.nn.Module) -> list[str]:
    return [n for n, m in module.named_modules() if isinstance(m, torch.nn.Linear)]


def _kind(name: str) -> tuple[str | None, str]:
    """(block prefix like 'transformer_blocks.3' or None, kind) of one Linear's qualified name."""
    m = _BLOCK.match(name)
    if m:
        inner = m.group(3)
        kind = next((k for k, p in _BLOCK_KINDS if p.search(inner)), "other")
        return f"{m.group(1)}.{m.group(2)}", kind
    return None, next((k for k, p in _TOP_KINDS if p.search(name)), "other")


def _regex(names: Sequence[str]) -> str:
    """An anchored regex matching exactly ``names`` (their shared dotted prefix factored out)."""
    common = names[0]
    for n in names[1:]:
        while not n.startswith(common):
            common = common[:-1]
    prefix = common[: common.rfind(".") + 1] if len(names) > 1 else names[0][: names[0].rfind(".") + 1]
    rest = [re.escape(n[len(prefix):]) for n in names]
    body = rest[0] if len(rest) == 1 else "(?:" + "|".join(rest) + ")"
    return "^" + re.escape(prefix) + body + "$"


def layer_groups(transformer: torch.nn.Module, *, per_block: bool = True) -> dict[str, str]:
    """Groups of the transformer's Linear layers, each a name and an anchored regex.

    Every Linear belongs to exactly one group. Per block (``per_block=True``): ``attn``, ``mlp``,
    ``adaln`` (the modulation Linear), ``embed`` (DiT's per-block timestep/class embedder) and, for
    FLUX double blocks, the context-stream ``*_context`` groups; outside blocks: ``embed`` and
    ``final`` (DiT's ``proj_out_1``/``proj_out_2``, FLUX's ``norm_out.linear``/``proj_out``).
    With ``per_block=False`` the same kinds are pooled across blocks (a coarse, 5x cheaper scan).

    Args:
        transformer: the denoiser (``DiTTransformer2DModel``, ``FluxTransformer2DModel``, ...).
        per_block: one group per kind per block, or one per kind.

    Returns:
        ``{group name: regex}`` in module order; the regexes are anchored (``re.search`` on the
        qualified name inside the transformer, as ``Quantize.exclude`` uses them).
    """
    members: dict[str, list[str]] = {}
    pooled: dict[str, tuple[str, list[str]]] = {}  # group -> (block kind prefix, inner names)
    for name in _linear_names(transformer):
        block, kind = _kind(name)
        if block is None or per_block:
            members.setdefault(f"{block}.{kind}" if block else kind, []).append(name)
            continue
        # Pooled: the kind depends only on the name inside the block, so "any block index" + the
        # inner names of this kind matches exactly this group's layers.
        stack = block.rsplit(".", 1)[0]
        inner = name[len(block) + 1:]
        group = f"{stack}.{kind}"
        members.setdefault(group, []).append(name)
        names = pooled.setdefault(group, (stack, []))[1]
        if inner not in names:
            names.append(inner)
    out = {}
    for g, full in members.items():
        if g in pooled:
            stack, inners = pooled[g]
            alts = "|".join(re.escape(i) for i in inners)
            out[g] = "^" + re.escape(stack) + r"\.\d+\." + (f"(?:{alts})" if len(inners) > 1 else alts) + "$"
        else:
            out[g] = _regex(full)
    return out


# ------------------------------------------------------------------------------------------ scan


@dataclass(frozen=True)
class GroupScore:
    """The error of quantizing one group alone (lower PSNR/SSIM, higher rel_mse = more sensitive)."""

    name: str
    pattern: str
    layers: int
    psnr: float
    ssim: float
    rel_mse: float


@dataclass
class SensitivityResult:
    """A ranked scan, most sensitive group first; JSON-serialisable (:meth:`save` / :meth:`load`)."""

    model: str
    method: str
    class_labels: list[int]
    """The workload's class labels (DiT); empty for a prompted pipeline."""
    seeds: list[int]
    steps: int
    groups: list[GroupScore]
    all_quantized: dict[str, float] = field(default_factory=dict)
    """The error with every group quantized at once (plain quantization), for comparison."""
    seconds: float = 0.0
    kind: str = "images"
    """``images`` (:func:`scan`) or ``proxy`` (:func:`proxy_scan`; psnr/ssim are then NaN)."""
    prompts: list[str] = field(default_factory=list)
    """The workload's prompts (FLUX.1, FLUX.2, Qwen-Image); empty for DiT."""

    def exclude_patterns(self, n: int) -> tuple[str, ...]:
        """The regexes of the ``n`` most sensitive groups, for ``Quantize.exclude``.

        Raises:
            ProfileError: ``n`` is negative.
        """
        if n < 0:
            raise ProfileError(f"exclude_patterns: n must be >= 0, got {n}")
        return tuple(g.pattern for g in self.groups[:n])

    def to_dict(self) -> dict[str, Any]:
        d = asdict(self)
        d["schema"] = "fluxtune.sensitivity/1"
        return d

    def save(self, path: str | Path) -> Path:
        """Write the result as JSON; returns the path."""
        from fluxtune.presets import write_atomic

        return write_atomic(path, json.dumps(self.to_dict(), indent=2, allow_nan=True) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SensitivityResult:
        """Read a result written by :meth:`save`.

        Raises:
            ProfileError: the file is not a sensitivity result.
        """
        try:
            d = json.loads(Path(path).read_text())
            if d.pop("schema", None) != "fluxtune.sensitivity/1":
                raise ValueError("missing schema fluxtune.sensitivity/1")
            d["groups"] = [GroupScore(**g) for g in d["groups"]]
            return cls(**d)
        except (OSError, ValueError, TypeError, KeyError) as e:
            raise ProfileError(f"{path}: not a sensitivity result ({e})") from e


def check_method(method: str, device: torch.device, group_size: int | None = None) -> Quantize:
    if method not in METHODS:
        raise ProfileError(f"sensitivity method {method!r} is not one of {', '.join(METHODS)}")
    extra = {} if group_size is None else {"group_size": group_size}
    q = Quantize(method=method, **extra)  # type: ignore[arg-type]
    need = q.min_compute_capability
    if need is not None:
        have = torch.cuda.get_device_capability(device) if device.type == "cuda" else None
        if have is None or have < need:
            where = f"SM {have[0]}.{have[1]}" if have else "no CUDA GPU"
            raise UnsupportedHardwareError(
                f"{method} needs a CUDA GPU with SM {need[0]}.{need[1]}+ (here: {where}); "
                "use int8_weight or int8_dynamic")
    return q


def quantize_matching(module: torch.nn.Module, q: Quantize, patterns: Iterable[str], on_cuda: bool) -> int:
    """Quantize the Linear layers whose name matches any pattern; returns how many."""
    from fluxtune.tuning.quantize import quantize_module

    compiled = [re.compile(p) for p in patterns]
    hit, _ = quantize_module(module, q, on_cuda=on_cuda, only=lambda fqn: any(p.search(fqn) for p in compiled))
    return len(hit)


DEFAULT_PROMPTS = ("a red circle on a white background", "a photo of a cat sitting on a wooden table")
"""A prompted scan's default workload: two short prompts, one simple shape, one photographic scene."""


def render(pipe: Any, inputs: Sequence[int] | Sequence[str], seeds: Sequence[int], steps: int,
           guidance_scale: float | None = 4.0, **call: Any) -> np.ndarray:
    """Images (len(seeds) * len(inputs), H, W, 3) in [0, 1]: each seed renders every class label (DiT) or
    prompt (FLUX.1, FLUX.2, Qwen-Image; ``call`` adds e.g. height/width; ``guidance_scale=None`` leaves the
    pipeline's own).

    Input ``j`` under seed ``s`` uses a CPU generator seeded ``s * 1000 + j``, so a run is the
    same on any device and profile.
    """
    out = []
    prompted = bool(inputs) and isinstance(inputs[0], str)
    kwargs = dict(call)
    if guidance_scale is not None:
        kwargs["guidance_scale"] = guidance_scale
    for s in seeds:
        gens = [torch.Generator().manual_seed(s * 1000 + j) for j in range(len(inputs))]
        with torch.inference_mode():
            if prompted:
                res = pipe(prompt=list(inputs), num_inference_steps=steps, generator=gens, output_type="np", **kwargs)
            else:
                res = pipe(class_labels=list(inputs), num_inference_steps=steps, generator=gens, output_type="np",
                           **kwargs)
        out.append(np.asarray(res.images, dtype=np.float32))
    return np.concatenate(out, axis=0)


def image_errors(images: np.ndarray, reference: np.ndarray) -> dict[str, float]:
    from torchmetrics.functional.image import peak_signal_noise_ratio, structural_similarity_index_measure

    from fluxtune.measure import PSNR_CAP

    a = torch.from_numpy(images).permute(0, 3, 1, 2).double()
    b = torch.from_numpy(reference).permute(0, 3, 1, 2).double()
    mse = float(((a - b) ** 2).mean())
    psnr = PSNR_CAP if mse == 0 else min(PSNR_CAP, float(peak_signal_noise_ratio(a, b, data_range=1.0)))
    kernel = 7 if min(a.shape[-2:]) >= 7 else 3
    ssim_t = structural_similarity_index_measure(a, b, data_range=1.0, kernel_size=kernel)
    ssim = float(ssim_t[0] if isinstance(ssim_t, tuple) else ssim_t)
    return {"psnr": psnr, "ssim": ssim, "rel_mse": mse / max(float((b**2).mean()), 1e-12)}


def scan(
    pipe: Any,
    method: str = "int8_weight",
    *,
    class_labels: Sequence[int] = (0, 1, 2, 3),
    prompts: Sequence[str] | None = None,
    seeds: Sequence[int] = (0,),
    steps: int = 10,
    guidance_scale: float | None = 4.0,
    per_block: bool = True,
    groups: dict[str, str] | None = None,
    reference: np.ndarray | None = None,
    model: str = "",
    progress: Callable[[int, int, str], None] | None = None,
    call: dict[str, Any] | None = None,
    group_size: int | None = None,
) -> SensitivityResult:
    """Quantize one group at a time and rank the groups by the harm to the images.

    The pipe's transformer is never modified: each trial quantizes a deep copy, which is swapped in
    for the render and dropped afterwards (the original is back in place on return, also on error).

    Args:
        pipe: a DiT pipeline (class labels) or a prompted one (FLUX.1, FLUX.2, Qwen-Image: prompts); its
            transformer must be unquantized.
        method: ``int8_weight``, ``int8_dynamic`` or ``fp8_dynamic`` (CUDA SM 8.9+/9.0).
        class_labels, prompts, seeds, steps, guidance_scale, call: the fixed workload (see :func:`render`;
            ``call``: further pipeline arguments such as height and width);
            ``prompts`` default to :data:`DEFAULT_PROMPTS` on a prompted pipeline, ``class_labels`` are DiT's.
        per_block: group granularity (see :func:`layer_groups`); ignored when ``groups`` is given.
        groups: explicit ``{name: regex}`` groups instead of :func:`layer_groups`.
        reference: the unquantized images of the same workload, if already rendered.
        model: a label stored in the result.
        progress: called as ``progress(i, n, group)`` before each trial.
        group_size: int8_weight's inputs per scale, as the profile's ``quantize.group_size`` (None: its default).

    Returns:
        The groups ranked most sensitive first (lowest PSNR; ties by higher rel_mse, then name).

    Raises:
        PipelineError: neither a DiT nor a prompted pipeline, or its transformer is already quantized.
        UnsupportedHardwareError: fp8 without a GPU of SM 8.9+.
    """
    from fluxtune.measure.workload import call_parameters
    from fluxtune.tuning.quantize import quantized_linear_count

    params = call_parameters(pipe)
    inputs: Sequence[int] | Sequence[str]
    if "class_labels" in params:
        inputs, prompts = list(class_labels), []
    elif "prompt" in params and hasattr(pipe, "transformer"):
        inputs = prompts = list(prompts or DEFAULT_PROMPTS)
    else:
        raise PipelineError(f"sensitivity scans render class labels (DiT) or prompts into a transformer "
                            f"pipeline; {type(pipe).__name__} takes neither")
    pristine = pipe.transformer
    if quantized_linear_count(pristine)[0]:
        raise PipelineError("the transformer is already quantized; scan an unquantized pipeline")
    device = next(pristine.parameters()).device
    q = check_method(method, device, group_size)
    on_cuda = device.type == "cuda"
    groups = groups if groups is not None else layer_groups(pristine, per_block=per_block)
    t0 = time.perf_counter()
    ref = reference if reference is not None else render(pipe, inputs, seeds, steps, guidance_scale, **(call or {}))

    def trial(patterns: Iterable[str]) -> tuple[int, dict[str, float]]:
        candidate = copy.deepcopy(pristine)
        n = quantize_matching(candidate, q, patterns, on_cuda)
        pipe.transformer = candidate
        try:
            return n, image_errors(render(pipe, inputs, seeds, steps, guidance_scale, **(call or {})), ref)
        finally:
            pipe.transformer = pristine

    scores = []
    for i, (name, pattern) in enumerate(groups.items()):
        if progress:
            progress(i, len(groups) + 1, name)
        n, err = trial([pattern])
        scores.append(GroupScore(name, pattern, n, err["psnr"], err["ssim"], err["rel_mse"]))
    if progress:
        progress(len(groups), len(groups) + 1, "all groups")
    _, all_err = trial(list(groups.values()))
    scores.sort(key=lambda g: (g.psnr, -g.rel_mse, g.name))
    return SensitivityResult(model=model, method=method, class_labels=[] if prompts else list(class_labels),
                             seeds=list(seeds), steps=steps, groups=scores, all_quantized=all_err,
                             seconds=time.perf_counter() - t0, prompts=list(prompts))


# ----------------------------------------------------------------------------------------- proxy


def proxy_scan(
    pipe: Any,
    method: str = "int8_weight",
    *,
    class_labels: Sequence[int] = (0, 1, 2, 3),
    seed: int = 0,
    timestep: int = 500,
    per_block: bool = True,
    model: str = "",
) -> SensitivityResult:
    """The cheap proxy: one transformer forward, each Linear quantized alone on its captured input.

    A group's score is the relative output MSE of its layers (``sum ||y_q - y||^2 / sum ||y||^2``
    over the group's layers) at one timestep on random latents; ``psnr`` and ``ssim`` are NaN. It
    misses how errors compound through the blocks and over the denoising steps: use it to prune
    the candidates of a :func:`scan`, not instead of one.

    Raises:
        PipelineError: not a DiT pipeline.
        UnsupportedHardwareError: fp8 without a GPU of SM 8.9+.
    """
    from fluxtune.pipelines import family

    if family(pipe) != "dit":
        raise PipelineError(f"proxy_scan needs a DiT pipeline, got {type(pipe).__name__}")
    tr = pipe.transformer
    p0 = next(tr.parameters())
    q = check_method(method, p0.device)
    t0 = time.perf_counter()
    inputs: dict[str, torch.Tensor] = {}
    linears = {n: m for n, m in tr.named_modules() if isinstance(m, torch.nn.Linear)}
    hooks = [m.register_forward_pre_hook(lambda _m, args, n=n: inputs.__setitem__(n, args[0].detach()))
             for n, m in linears.items()]
    cfg = tr.config
    g = torch.Generator().manual_seed(seed)
    latents = torch.randn(len(class_labels), cfg.in_channels, cfg.sample_size, cfg.sample_size, generator=g)
    try:
        with torch.inference_mode():
            tr(latents.to(p0.device, p0.dtype), timestep=torch.full((len(class_labels),), timestep, device=p0.device),
               class_labels=torch.tensor(list(class_labels), device=p0.device))
    finally:
        for h in hooks:
            h.remove()
    num: dict[str, float] = {}
    den: dict[str, float] = {}
    for n, lin in linears.items():
        x = inputs[n]
        with torch.inference_mode():
            y = lin(x).double()
        holder = torch.nn.Sequential(copy.deepcopy(lin))
        quantize_matching(holder, q, [r"^0$"], p0.device.type == "cuda")
        with torch.inference_mode():
            yq = holder(x).double()
        num[n] = float(((yq - y) ** 2).sum())
        den[n] = float((y**2).sum())
    scores = []
    for name, pattern in layer_groups(tr, per_block=per_block).items():
        members = [n for n in linears if re.search(pattern, n)]
        rel = sum(num[n] for n in members) / max(sum(den[n] for n in members), 1e-30)
        scores.append(GroupScore(name, pattern, len(members), float("nan"), float("nan"), rel))
    scores.sort(key=lambda s: (-s.rel_mse, s.name))
    return SensitivityResult(model=model, method=method, class_labels=list(class_labels), seeds=[seed], steps=0,
                             groups=scores, seconds=time.perf_counter() - t0, kind="proxy")
