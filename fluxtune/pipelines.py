"""Getting a diffusers pipeline: ``load(spec)`` and the built-in models.

A spec is one of
* a built-in name (``tiny-flux``, ``tiny-dit`` for CPU tests; ``flux-dev-replica``,
  ``flux-schnell-replica``, ``dit-xl-2-256``, ``dit-xl-2-512``: full-size random-weight replicas
  whose speed and memory are representative, whose images are not);
* a local directory written by ``save_pretrained``;
* a Hugging Face Hub id (``org/name``) through ``DiffusionPipeline.from_pretrained``.

Other modules add built-ins with :func:`register_builtin` (``fluxtune.minimodels`` does; the package
face ``fluxtune/__init__.py`` imports it). torch, diffusers and transformers are imported inside
functions so that importing this module (and ``fluxtune --help``) stays instant.
"""

from __future__ import annotations

import contextlib
import inspect
import os
import re
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import TYPE_CHECKING, Any, Literal

from fluxtune.errors import FluxtuneError, PipelineError, UnsupportedHardwareError

if TYPE_CHECKING:
    import torch
    from diffusers import DiffusionPipeline
    from transformers import CLIPTokenizer, T5Tokenizer

__all__ = [
    "BUILTINS",
    "CLIP_L_CONFIG",
    "DIT_SCHEDULER_CONFIG",
    "FLUX_DEV_SCHEDULER_CONFIG",
    "FLUX_DEV_TRANSFORMER_CONFIG",
    "FLUX_SCHNELL_SCHEDULER_CONFIG",
    "FLUX_VAE_CONFIG",
    "SD_VAE_FT_EMA_CONFIG",
    "T5_XXL_CONFIG",
    "FAMILY_PIPELINES",
    "TRUE_CFG_FAMILIES",
    "BuiltinSpec",
    "denoiser",
    "dit_xl_2_config",
    "family",
    "family_of_class",
    "list_builtins",
    "load",
    "make_clip_tokenizer",
    "make_t5_tokenizer",
    "module_components",
    "parse_dtype",
    "register_builtin",
]

Family = Literal["flux", "dit", "flux2", "qwenimage"]

FAMILY_PIPELINES: dict[str, tuple[str, ...]] = {
    "flux": ("FluxPipeline",),
    "dit": ("DiTPipeline",),
    "flux2": ("Flux2Pipeline", "Flux2KleinPipeline"),
    "qwenimage": ("QwenImagePipeline",),
}
"""The diffusers pipeline classes (and their subclasses) of each family fluxtune tunes."""

TRUE_CFG_FAMILIES = ("flux", "qwenimage")
"""Families whose pipelines run true CFG (a negative prompt) as two transformer passes a step."""

# --------------------------------------------------------------------------------------- configs
# Full-size component configs (reference/diffusers-knobs.md §9.2, §9.4). Read-only views: the
# builders splat them into constructors, and tests/memory code read them.

FLUX_DEV_TRANSFORMER_CONFIG: Mapping[str, Any] = MappingProxyType({
    "patch_size": 1, "in_channels": 64, "out_channels": None, "num_layers": 19, "num_single_layers": 38,
    "attention_head_dim": 128, "num_attention_heads": 24, "joint_attention_dim": 4096,
    "pooled_projection_dim": 768, "guidance_embeds": True, "axes_dims_rope": (16, 56, 56),
})  # 11,901,408,320 parameters

FLUX_VAE_CONFIG: Mapping[str, Any] = MappingProxyType({
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2, "act_fn": "silu", "latent_channels": 16, "norm_num_groups": 32,
    "sample_size": 1024, "scaling_factor": 0.3611, "shift_factor": 0.1159, "latents_mean": None,
    "latents_std": None, "force_upcast": True, "use_quant_conv": False, "use_post_quant_conv": False,
    "mid_block_add_attention": True,
})  # 83,819,683 parameters

T5_XXL_CONFIG: Mapping[str, Any] = MappingProxyType({
    "vocab_size": 32128, "d_model": 4096, "d_kv": 64, "d_ff": 10240, "num_layers": 24,
    "num_decoder_layers": 24, "num_heads": 64, "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128, "dropout_rate": 0.1, "layer_norm_epsilon": 1e-6,
    "initializer_factor": 1.0, "feed_forward_proj": "gated-gelu", "dense_act_fn": "gelu_new",
    "is_gated_act": True, "is_encoder_decoder": True, "pad_token_id": 0, "eos_token_id": 1,
    "decoder_start_token_id": 0, "tie_word_embeddings": False,
})  # T5EncoderModel: 4,762,310,656 parameters

CLIP_L_CONFIG: Mapping[str, Any] = MappingProxyType({
    "vocab_size": 49408, "hidden_size": 768, "intermediate_size": 3072, "projection_dim": 768,
    "num_hidden_layers": 12, "num_attention_heads": 12, "max_position_embeddings": 77,
    "hidden_act": "quick_gelu", "layer_norm_eps": 1e-5, "attention_dropout": 0.0, "dropout": 0.0,
    "initializer_range": 0.02, "initializer_factor": 1.0, "pad_token_id": 1, "bos_token_id": 0,
    "eos_token_id": 2,
})  # CLIPTextModel: 123,060,480 parameters

FLUX_DEV_SCHEDULER_CONFIG: Mapping[str, Any] = MappingProxyType({
    "shift": 3.0, "use_dynamic_shifting": True, "base_shift": 0.5, "max_shift": 1.15,
    "base_image_seq_len": 256, "max_image_seq_len": 4096,
})

# schnell is timestep-distilled: no resolution-dependent shift.
FLUX_SCHNELL_SCHEDULER_CONFIG: Mapping[str, Any] = MappingProxyType({
    "shift": 1.0, "use_dynamic_shifting": False, "base_shift": 0.5, "max_shift": 1.15,
    "base_image_seq_len": 256, "max_image_seq_len": 4096,
})

SD_VAE_FT_EMA_CONFIG: Mapping[str, Any] = MappingProxyType({
    "in_channels": 3, "out_channels": 3, "down_block_types": ("DownEncoderBlock2D",) * 4,
    "up_block_types": ("UpDecoderBlock2D",) * 4, "block_out_channels": (128, 256, 512, 512),
    "layers_per_block": 2, "act_fn": "silu", "latent_channels": 4, "norm_num_groups": 32,
    "sample_size": 256, "scaling_factor": 0.18215,
})  # 83,653,863 parameters

DIT_SCHEDULER_CONFIG: Mapping[str, Any] = MappingProxyType({
    "num_train_timesteps": 1000, "beta_schedule": "linear", "prediction_type": "epsilon", "clip_sample": False,
})


def dit_xl_2_config(resolution: int = 256) -> dict[str, Any]:
    """The DiTTransformer2DModel config of DiT-XL/2 at 256 or 512 pixels (749,826,464 params at 256).

    Raises:
        PipelineError: for another resolution.
    """
    if resolution not in (256, 512):
        raise PipelineError(f"DiT-XL/2 resolution={resolution!r} does not exist; use 256 or 512")
    return {
        "sample_size": resolution // 8, "num_layers": 28, "attention_head_dim": 72, "num_attention_heads": 16,
        "in_channels": 4, "out_channels": 8, "patch_size": 2, "attention_bias": True,
        "activation_fn": "gelu-approximate", "num_embeds_ada_norm": 1000, "norm_type": "ada_norm_zero",
        "norm_elementwise_affine": False,
    }


# Parameter counts of whole replicas, used to refuse a build that cannot fit before allocating.
_FLUX_REPLICA_PARAMS = 11_901_408_320 + 4_762_310_656 + 123_060_480 + 83_819_683
_DIT_REPLICA_PARAMS = 749_826_464 + 83_653_863

# ----------------------------------------------------------------------------------------- dtypes

_DTYPES = {
    "bfloat16": "bfloat16", "bf16": "bfloat16",
    "float16": "float16", "fp16": "float16", "half": "float16",
    "float32": "float32", "fp32": "float32", "float": "float32",
}


def parse_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """Turn ``"bf16"``/``"bfloat16"``, ``"fp16"``/``"float16"``, ``"fp32"``/``"float32"`` into a torch dtype.

    Args:
        dtype: a name as above, or a torch dtype of one of those three.

    Returns:
        The torch dtype.

    Raises:
        PipelineError: for any other value.
    """
    import torch

    if isinstance(dtype, torch.dtype):
        name: str | None = str(dtype).removeprefix("torch.")
    else:
        name = _DTYPES.get(str(dtype).strip().lower().removeprefix("torch."))
    if name not in ("bfloat16", "float16", "float32"):
        raise PipelineError(f"dtype={dtype!r} is not supported; use bfloat16 (bf16), float16 (fp16) or float32 (fp32)")
    return getattr(torch, name)  # type: ignore[no-any-return]


def _resolve_device(device: str | torch.device | None, default: str) -> torch.device:
    import torch

    try:
        return torch.device(default if device is None else device)
    except (RuntimeError, TypeError) as exc:
        raise PipelineError(f"device={device!r} is not a torch device; use cpu, cuda or cuda:N") from exc


# ------------------------------------------------------------------------------------- tokenizers

# Characters of the offline T5 vocabulary: enough that different English prompts tokenize differently.
_T5_CHARS = "abcdefghijklmnopqrstuvwxyzABCDEFGHIJKLMNOPQRSTUVWXYZ0123456789.,;:!?'\"-()"


def make_clip_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    """A CLIP BPE tokenizer built in memory: one token per byte-level character, no merges.

    514 tokens (``<|startoftext|>`` = 0, ``<|endoftext|>`` = 1, also the pad token); pair it with a
    CLIP text encoder whose ``vocab_size >= 514``. It saves and reloads like a hub tokenizer.

    Args:
        model_max_length: padding/truncation length (77 for CLIP-L).
    """
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import CLIPTokenizer

    vocab: dict[str, int] = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for ch in sorted(ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
        vocab.setdefault(ch + "</w>", len(vocab))
    # transformers >= 5 builds the fast tokenizer from in-memory vocab/merges (no files, no hub).
    return CLIPTokenizer(vocab=vocab, merges=[], model_max_length=model_max_length)


def make_t5_tokenizer(model_max_length: int = 512) -> T5Tokenizer:
    """A T5 (Unigram) tokenizer built in memory over single characters.

    ``<pad>`` = 0, ``</s>`` = 1, ``<unk>`` = 2, then ``▁`` and letters, digits and punctuation
    (78 tokens); pair it with a T5 encoder whose ``vocab_size >= len(tokenizer)``.

    Args:
        model_max_length: longest prompt in tokens (FluxPipeline pads to its own max_sequence_length).
    """
    from transformers import T5Tokenizer  # T5TokenizerFast is T5Tokenizer in transformers 5

    vocab = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("\u2581", -2.0)]
    vocab += [(c, -5.0) for c in _T5_CHARS]
    return T5Tokenizer(vocab=vocab, extra_ids=0, model_max_length=model_max_length)


# --------------------------------------------------------------------------------- construction


@contextlib.contextmanager
def _seeded(seed: int) -> Iterator[None]:
    """Seed torch's CPU RNG for a deterministic build, then give the caller's RNG state back."""
    import torch

    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


@contextlib.contextmanager
def _uninitialized(device: torch.device, dtype: torch.dtype) -> Iterator[None]:
    """Construct modules directly on ``device`` in ``dtype`` with weight init skipped (§9.3).

    Parameters come out as ``torch.empty`` (garbage until :func:`_fill_random_`); buffers such as
    CLIP's position ids and DiT's sin-cos table are still computed, which building on ``meta`` and
    ``to_empty`` would lose. Needs :meth:`PreTrainedModel.tie_weights` afterwards: transformers
    ties embeddings inside ``init_weights``, which its ``no_init_weights`` turns off.
    """
    import torch
    from diffusers.models.modeling_utils import no_init_weights as diffusers_no_init
    from transformers.initialization import no_init_weights as transformers_no_init

    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device), diffusers_no_init(), transformers_no_init():
            yield
    finally:
        # A leaked bf16 default dtype would silently change every later tensor in the process.
        torch.set_default_dtype(previous)


def _fill_random_(module: Any, seed: int) -> None:
    """Give uninitialised parameters sane random values in place.

    N(0, 0.02) everywhere except normalisation layers (weight 1, bias 0), so activations keep
    their scale through deep stacks instead of collapsing towards zero.
    """
    import torch

    device = next(module.parameters()).device
    if device.type == "meta":
        return
    generator = torch.Generator(device=device).manual_seed(seed)
    with torch.no_grad():
        for sub in module.modules():
            is_norm = isinstance(sub, torch.nn.LayerNorm | torch.nn.GroupNorm) or type(sub).__name__.endswith(
                ("RMSNorm", "LayerNorm")
            )
            for name, param in sub.named_parameters(recurse=False):
                if is_norm:
                    param.fill_(1.0 if name == "weight" else 0.0)
                else:
                    param.normal_(0.0, 0.02, generator=generator)


def _require_device_for(name: str, device: torch.device, n_params: int, dtype: torch.dtype) -> None:
    """Refuse a replica build that cannot succeed, before allocating gigabytes of it."""
    import torch

    if device.type != "cuda":
        return
    needed = n_params * torch.empty((), dtype=dtype, device="meta").element_size()
    if not torch.cuda.is_available():
        raise UnsupportedHardwareError(
            f"{name} is built on a CUDA GPU (about {needed / 2**30:.1f} GiB in {str(dtype).removeprefix('torch.')}) "
            "and torch sees none here; use tiny-flux or tiny-dit on CPU, or device='meta' to inspect it"
        )
    free, _total = torch.cuda.mem_get_info(device)
    if free < needed:
        raise UnsupportedHardwareError(
            f"{name} needs about {needed / 2**30:.1f} GiB on {device} but only {free / 2**30:.1f} GiB is free; "
            "build it with device='cpu' and offload, or free GPU memory"
        )


def _move(model: Any, device: torch.device, dtype: torch.dtype) -> None:
    """Cast a freshly built tiny model (same weights, rounded) and put it in eval mode."""
    import torch

    # nn.Module.to, not ModelMixin.to: the latter warns about _keep_in_fp32_modules on every dtype
    # cast, even when that list is empty, and there is nothing to keep in fp32 in these models.
    torch.nn.Module.to(model, device=device, dtype=dtype)
    model.eval()


def _build_tiny_flux(device: str | None = None, dtype: str = "float32", *, seed: int = 0) -> DiffusionPipeline:
    """tiny-flux: a FluxPipeline with a real (tiny) CLIP + T5 text stack; 64x64 images by default.

    Layout mirrors FLUX.1-dev (VAE scale factor 8, 16-channel packed latents, guidance embedding,
    dynamic-shift scheduler), so sizes must be multiples of 16 as for the real model.
    """
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    dev = _resolve_device(device, "cpu")
    torch_dtype = parse_dtype(dtype)
    clip_tokenizer = make_clip_tokenizer(77)
    t5_tokenizer = make_t5_tokenizer(512)
    with _seeded(seed):
        transformer = FluxTransformer2DModel(
            patch_size=1, in_channels=16, num_layers=2, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=32, pooled_projection_dim=32, guidance_embeds=True,
            axes_dims_rope=(4, 4, 8),  # must sum to attention_head_dim
        )
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(4, 4, 4, 4), layers_per_block=1,
            latent_channels=4, norm_num_groups=1, sample_size=32, use_quant_conv=False,
            use_post_quant_conv=False,
            # FLUX decodes latents / scaling_factor + shift_factor: shift_factor must not be None.
            shift_factor=0.0609, scaling_factor=1.5035,
        )
        text_encoder = CLIPTextModel(CLIPTextConfig(
            vocab_size=len(clip_tokenizer), hidden_size=32, intermediate_size=37, projection_dim=32,
            num_hidden_layers=2, num_attention_heads=4, max_position_embeddings=77, hidden_act="gelu",
            layer_norm_eps=1e-5, bos_token_id=0, eos_token_id=1, pad_token_id=1,
        ))
        text_encoder_2 = T5EncoderModel(T5Config(
            vocab_size=len(t5_tokenizer), d_model=32, d_kv=8, d_ff=37, num_layers=2, num_heads=4,
            relative_attention_num_buckets=8, feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1,
        ))
    for model in (transformer, vae, text_encoder, text_encoder_2):
        _move(model, dev, torch_dtype)
    pipe: Any = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLUX_DEV_SCHEDULER_CONFIG), vae=vae,
        text_encoder=text_encoder, tokenizer=clip_tokenizer, text_encoder_2=text_encoder_2,
        tokenizer_2=t5_tokenizer, transformer=transformer,
    )
    # FluxPipeline hard-codes default_sample_size=128 (1024 px at scale 8); 8 gives 64x64. This is
    # an instance attribute: a save_pretrained/from_pretrained copy is back to diffusers' default.
    pipe.default_sample_size = 8
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _build_tiny_dit(device: str | None = None, dtype: str = "float32", *, seed: int = 0) -> DiffusionPipeline:
    """tiny-dit: DiTPipeline with the diffusers-test transformer and a 4-level tiny VAE (128x128 images)."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    dev = _resolve_device(device, "cpu")
    torch_dtype = parse_dtype(dtype)
    with _seeded(seed):
        transformer = DiTTransformer2DModel(
            sample_size=16, num_layers=2, patch_size=4, attention_head_dim=8, num_attention_heads=2,
            in_channels=4, out_channels=8, attention_bias=True, activation_fn="gelu-approximate",
            num_embeds_ada_norm=1000, norm_type="ada_norm_zero", norm_elementwise_affine=False,
        )
        # Four levels so that, as for DiT-XL/2, image side = transformer sample_size x 8.
        vae = AutoencoderKL(
            in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 4,
            up_block_types=("UpDecoderBlock2D",) * 4, block_out_channels=(4, 4, 4, 4), layers_per_block=1,
            latent_channels=4, norm_num_groups=1, sample_size=128, scaling_factor=0.18215,
        )
    for model in (transformer, vae):
        _move(model, dev, torch_dtype)
    pipe: Any = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(**DIT_SCHEDULER_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _build_flux_replica(
    device: str | None = None, dtype: str = "bfloat16", *, schnell: bool = False, seed: int = 0
) -> DiffusionPipeline:
    """Full-size FLUX.1 (dev or schnell) with random weights, materialised directly on ``device``."""
    from diffusers import AutoencoderKL, FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

    name = "flux-schnell-replica" if schnell else "flux-dev-replica"
    dev = _resolve_device(device, "cuda")
    torch_dtype = parse_dtype(dtype)
    _require_device_for(name, dev, _FLUX_REPLICA_PARAMS, torch_dtype)
    with _uninitialized(dev, torch_dtype):
        transformer = FluxTransformer2DModel(**{**FLUX_DEV_TRANSFORMER_CONFIG, "guidance_embeds": not schnell})
        vae = AutoencoderKL(**FLUX_VAE_CONFIG)
        text_encoder = CLIPTextModel(CLIPTextConfig(**CLIP_L_CONFIG))
        text_encoder_2 = T5EncoderModel(T5Config(**T5_XXL_CONFIG))
    for text_model in (text_encoder, text_encoder_2):
        text_model.tie_weights()  # skipped with init; without it T5 carries a second 131M-param embedding
    models: tuple[Any, ...] = (transformer, vae, text_encoder, text_encoder_2)
    for i, model in enumerate(models):
        _fill_random_(model, seed + i)
        model.eval()
    pipe: Any = FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(
            **(FLUX_SCHNELL_SCHEDULER_CONFIG if schnell else FLUX_DEV_SCHEDULER_CONFIG)
        ),
        vae=vae, text_encoder=text_encoder, tokenizer=make_clip_tokenizer(77),
        text_encoder_2=text_encoder_2, tokenizer_2=make_t5_tokenizer(512),
        transformer=transformer,
    )
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _build_flux_dev_replica(device: str | None = None, dtype: str = "bfloat16", *, seed: int = 0) -> DiffusionPipeline:
    """flux-dev-replica: full-size FLUX.1-dev, random weights (about 31.4 GiB in bf16)."""
    return _build_flux_replica(device, dtype, schnell=False, seed=seed)


def _build_flux_schnell_replica(
    device: str | None = None, dtype: str = "bfloat16", *, seed: int = 0
) -> DiffusionPipeline:
    """flux-schnell-replica: full-size FLUX.1-schnell (no guidance embedding), random weights."""
    return _build_flux_replica(device, dtype, schnell=True, seed=seed)


def _build_dit_xl_2(
    resolution: int, device: str | None = None, dtype: str = "bfloat16", *, seed: int = 0
) -> DiffusionPipeline:
    """Full-size DiT-XL/2 with the sd-vae-ft-ema VAE, random weights, materialised on ``device``."""
    from diffusers import AutoencoderKL, DDIMScheduler, DiTPipeline, DiTTransformer2DModel

    name = f"dit-xl-2-{resolution}"
    dev = _resolve_device(device, "cuda")
    torch_dtype = parse_dtype(dtype)
    _require_device_for(name, dev, _DIT_REPLICA_PARAMS, torch_dtype)
    # Default-device route, not meta + to_empty: PatchEmbed computes its sin-cos pos_embed buffer
    # at construction and to_empty would leave it as garbage.
    with _uninitialized(dev, torch_dtype):
        transformer = DiTTransformer2DModel(**dit_xl_2_config(resolution))
        vae = AutoencoderKL(**SD_VAE_FT_EMA_CONFIG)
    models: tuple[Any, ...] = (transformer, vae)
    for i, model in enumerate(models):
        _fill_random_(model, seed + i)
        model.eval()
    pipe: Any = DiTPipeline(transformer=transformer, vae=vae, scheduler=DDIMScheduler(**DIT_SCHEDULER_CONFIG))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _build_dit_xl_2_256(device: str | None = None, dtype: str = "bfloat16", *, seed: int = 0) -> DiffusionPipeline:
    """dit-xl-2-256: full-size DiT-XL/2 for 256x256 images, random weights."""
    return _build_dit_xl_2(256, device, dtype, seed=seed)


def _build_dit_xl_2_512(device: str | None = None, dtype: str = "bfloat16", *, seed: int = 0) -> DiffusionPipeline:
    """dit-xl-2-512: full-size DiT-XL/2 for 512x512 images, random weights."""
    return _build_dit_xl_2(512, device, dtype, seed=seed)


# ------------------------------------------------------------------------------------- registry


@dataclass(frozen=True)
class BuiltinSpec:
    """A model fluxtune can build without downloading anything.

    ``builder(device=None, dtype=...)`` returns a ready pipeline (progress bar off).
    """

    name: str
    family: Family
    description: str
    builder: Callable[..., DiffusionPipeline]
    needs_gpu: bool = False
    generation: dict[str, Any] = field(default_factory=dict)
    """Profile ``generation`` settings the model was made for (e.g. its size); searches start from them."""
    dtype: str | None = None
    """The dtype to load it in when the user names none (None: the loader's default)."""


BUILTINS: dict[str, BuiltinSpec] = {}

_NAME_RE = re.compile(r"^[a-z0-9][a-z0-9._-]*$")


def register_builtin(spec: BuiltinSpec, *, replace: bool = False) -> BuiltinSpec:
    """Add a built-in model to :data:`BUILTINS`.

    Args:
        spec: the model; its name must be lowercase letters, digits, ``.``, ``_``, ``-`` (no ``/``,
            which would read as a hub id or a path).
        replace: allow overwriting an existing entry of the same name.

    Returns:
        ``spec``, so the call can be used as an expression.

    Raises:
        PipelineError: bad name or family, or the name is taken and ``replace`` is False.
    """
    if not _NAME_RE.match(spec.name):
        raise PipelineError(
            f"built-in name {spec.name!r} is invalid; use lowercase letters, digits, '.', '_' and '-'"
        )
    if spec.family not in FAMILY_PIPELINES:
        raise PipelineError(f"built-in {spec.name!r} has family={spec.family!r}; use one of {', '.join(FAMILY_PIPELINES)}")
    if spec.name in BUILTINS and not replace and BUILTINS[spec.name] != spec:
        raise PipelineError(f"built-in {spec.name!r} is already registered; pass replace=True to override it")
    BUILTINS[spec.name] = spec
    return spec


for _spec in (
    BuiltinSpec("tiny-flux", "flux", "FluxPipeline, ~0.2M params, real CLIP+T5 text stack, CPU tests (64x64)",
                _build_tiny_flux),
    BuiltinSpec("tiny-dit", "dit", "DiTPipeline, tiny transformer and VAE, CPU tests (128x128)", _build_tiny_dit),
    BuiltinSpec("tiny-flux2-klein", "flux2",
                "Flux2KleinPipeline, ~0.5M params, tiny 36-layer Qwen3 text encoder, CPU tests (64x64)",
                lambda **kw: _llm_families().build_tiny_flux2_klein(**kw),
                generation={"height": 64, "width": 64, "max_sequence_length": 64, "steps": 4}),
    BuiltinSpec("tiny-flux2-dev", "flux2",
                "Flux2Pipeline (FLUX.2 [dev]), ~0.26M params, tiny 40-layer Mistral-3 text encoder, CPU tests (64x64)",
                lambda **kw: _llm_families().build_tiny_flux2_dev(**kw),
                generation={"height": 64, "width": 64, "max_sequence_length": 64, "steps": 4}),
    BuiltinSpec("tiny-qwen-image", "qwenimage",
                "QwenImagePipeline, ~0.8M params, tiny Qwen2.5-VL text encoder, CPU tests (64x64)",
                lambda **kw: _llm_families().build_tiny_qwen_image(**kw),
                generation={"height": 64, "width": 64, "max_sequence_length": 64, "steps": 4}),
    BuiltinSpec("flux2-klein-4b-replica", "flux2",
                "full-size FLUX.2 [klein] 4B (3.9B transformer, Qwen3-4B encoder) with random weights (14.9 GiB bf16)",
                lambda **kw: _llm_families().build_flux2_klein_replica(size="4b", **kw), needs_gpu=True,
                generation={"height": 1024, "width": 1024, "steps": 4}),
    BuiltinSpec("flux2-klein-9b-replica", "flux2",
                "full-size FLUX.2 [klein] 9B (9.1B transformer, Qwen3-8B encoder) with random weights (32.3 GiB bf16)",
                lambda **kw: _llm_families().build_flux2_klein_replica(size="9b", **kw), needs_gpu=True,
                generation={"height": 1024, "width": 1024, "steps": 4}),
    BuiltinSpec("flux2-dev-replica", "flux2",
                "full-size FLUX.2 [dev] (32.2B transformer, Mistral-Small-3.1-24B encoder) with random weights (105 GiB bf16)",
                lambda **kw: _llm_families().build_flux2_dev_replica(**kw), needs_gpu=True,
                generation={"height": 1024, "width": 1024, "steps": 28}),
    BuiltinSpec("qwen-image-replica", "qwenimage",
                "full-size Qwen-Image (20.4B MMDiT, Qwen2.5-VL-7B encoder) with random weights (53.7 GiB bf16)",
                lambda **kw: _llm_families().build_qwen_image_replica(**kw), needs_gpu=True,
                generation={"height": 1024, "width": 1024, "steps": 50}),
    BuiltinSpec("flux-dev-replica", "flux",
                "full-size FLUX.1-dev with random weights (31.4 GiB bf16): real speed/memory, not quality",
                _build_flux_dev_replica, needs_gpu=True),
    BuiltinSpec("flux-schnell-replica", "flux",
                "full-size FLUX.1-schnell with random weights (no guidance embedding)",
                _build_flux_schnell_replica, needs_gpu=True),
    BuiltinSpec("dit-xl-2-256", "dit", "full-size DiT-XL/2 256x256 with random weights (1.6 GiB bf16)",
                _build_dit_xl_2_256, needs_gpu=True),
    BuiltinSpec("dit-xl-2-512", "dit", "full-size DiT-XL/2 512x512 with random weights (1.6 GiB bf16)",
                _build_dit_xl_2_512, needs_gpu=True),
):
    register_builtin(_spec)


def _llm_families() -> Any:
    from fluxtune import pipelines_llm  # their builders import diffusers' FLUX.2/Qwen-Image classes

    return pipelines_llm


def builtin(name: str) -> BuiltinSpec | None:
    """The built-in called ``name`` (those registered by other modules, such as the mini models, included), or None."""
    return BUILTINS.get(name)


def list_builtins() -> list[BuiltinSpec]:
    """All built-in models, sorted by name."""
    return [BUILTINS[name] for name in sorted(BUILTINS)]


# ----------------------------------------------------------------------------------------- load

_HUB_ID_RE = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def _alternatives() -> str:
    names = ", ".join(spec.name for spec in list_builtins())
    return f"use a built-in ({names}), a local directory written by save_pretrained, or a hub id (org/name)"


def _first_line(exc: BaseException, limit: int = 200) -> str:
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    text = text if len(text) <= limit else text[: limit - 3] + "..."
    return f"{type(exc).__name__}: {text}" if text else type(exc).__name__


def _passthrough(exc: BaseException) -> bool:
    """Errors that must keep their type: our own, and OOM (measurement treats it as a status)."""
    import torch

    return isinstance(exc, FluxtuneError | torch.OutOfMemoryError)


def load(
    spec: str,
    *,
    device: str | None = None,
    dtype: str = "bfloat16",
    **from_pretrained_kwargs: Any,
) -> DiffusionPipeline:
    """Build or load a pipeline.

    Args:
        spec: a built-in name (see :func:`list_builtins`), a local directory written by
            ``save_pretrained``, or a Hugging Face Hub id ``org/name``, tried in that order (write
            ``./tiny-flux`` for a directory that shares a built-in's name).
        device: where to put it. Built-ins use their own default (CPU for tiny models, CUDA for
            replicas); loaded pipelines stay where ``from_pretrained`` puts them (CPU) if None.
        dtype: ``bfloat16``/``bf16``, ``float16``/``fp16`` or ``float32``/``fp32``.
        **from_pretrained_kwargs: passed to ``DiffusionPipeline.from_pretrained`` (e.g. ``variant``,
            ``quantization_config``), or to the builder of a built-in (e.g. ``seed``).

    Returns:
        The pipeline.

    Raises:
        PipelineError: unknown name, bad dtype or device, missing directory, a download or load failure.
        UnsupportedHardwareError: a GPU-only built-in on a machine without a usable GPU.
    """
    torch_dtype = parse_dtype(dtype)
    if "torch_dtype" in from_pretrained_kwargs:
        raise PipelineError("torch_dtype= is deprecated in diffusers 0.42; pass dtype='bfloat16' (or fp16/fp32)")
    if spec in BUILTINS:
        return _build_builtin(BUILTINS[spec], device, dtype, from_pretrained_kwargs)
    path = os.path.expanduser(spec)
    if os.path.isdir(path):
        return _from_pretrained(path, torch_dtype, device, from_pretrained_kwargs, local=True)
    if os.path.exists(path):
        raise PipelineError(
            f"model {spec!r} is a file; pass the directory written by save_pretrained (single-file checkpoints "
            "are not supported)"
        )
    if _HUB_ID_RE.match(spec) and not spec.startswith("."):
        return _from_pretrained(spec, torch_dtype, device, from_pretrained_kwargs, local=False)
    if os.sep in spec or spec.startswith((".", "~")):
        raise PipelineError(f"model directory {spec!r} does not exist; {_alternatives()}")
    raise PipelineError(f"unknown model {spec!r}; {_alternatives()}")


def _build_builtin(
    spec: BuiltinSpec, device: str | None, dtype: str, kwargs: dict[str, Any]
) -> DiffusionPipeline:
    params = inspect.signature(spec.builder).parameters
    takes_any = any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    unknown = sorted(k for k in kwargs if k not in params) if not takes_any else []
    if unknown:
        raise PipelineError(
            f"built-in {spec.name!r} does not take {', '.join(unknown)}; "
            f"it takes {', '.join(p for p in params if p not in ('device', 'dtype')) or 'only device and dtype'}"
        )
    return spec.builder(device=device, dtype=dtype, **kwargs)


def _from_pretrained(
    source: str, torch_dtype: torch.dtype, device: str | None, kwargs: dict[str, Any], *, local: bool
) -> DiffusionPipeline:
    from diffusers import DiffusionPipeline

    kwargs = dict(kwargs)
    if local:
        kwargs.setdefault("local_files_only", True)
    try:
        pipe = DiffusionPipeline.from_pretrained(source, dtype=torch_dtype, **kwargs)
    except Exception as exc:
        if _passthrough(exc):
            raise
        if local:
            raise PipelineError(
                f"could not load a pipeline from directory {source!r} ({_first_line(exc)}); "
                "it must be a save_pretrained output with model_index.json"
            ) from exc
        # Hub and network failures surface as OSError (incl. huggingface_hub's errors, offline mode).
        what = "could not be downloaded" if isinstance(exc, OSError | ConnectionError) else "could not be loaded"
        raise PipelineError(
            f"hub model {source!r} {what} ({_first_line(exc)}); {_alternatives()}"
        ) from exc
    if device is not None:
        pipe.to(_resolve_device(device, "cpu"))
    pipe.set_progress_bar_config(disable=True)
    return pipe


# ------------------------------------------------------------------------------------ inspection


def family(pipe: Any) -> str:
    """The family of a pipeline (:data:`FAMILY_PIPELINES`: ``"flux"`` for FluxPipeline and its subclasses,
    ``"flux2"`` for FLUX.2 [dev] and [klein], ...), else ``"other"``."""
    for cls in type(pipe).__mro__:
        found = family_of_class(cls.__name__)
        if found != "other":
            return found
    return "other"


def family_of_class(class_name: str) -> str:
    """The family of a pipeline class name (as ``model_index.json`` spells it), else ``"other"``."""
    return next((fam for fam, names in FAMILY_PIPELINES.items() if class_name in names), "other")


def denoiser(pipe: Any) -> torch.nn.Module:
    """The denoising network: ``pipe.transformer``, or ``pipe.unet`` for UNet pipelines.

    Raises:
        PipelineError: the pipeline has neither.
    """
    for name in ("transformer", "unet"):
        module = getattr(pipe, name, None)
        if module is not None:
            return module  # type: ignore[no-any-return]
    raise PipelineError(f"{type(pipe).__name__} has no transformer or unet; fluxtune tunes FLUX and DiT pipelines")


def module_components(pipe: Any) -> dict[str, torch.nn.Module]:
    """The pipeline's ``torch.nn.Module`` components that are set, in ``pipe.components`` order."""
    import torch

    return {name: comp for name, comp in pipe.components.items() if isinstance(comp, torch.nn.Module)}
