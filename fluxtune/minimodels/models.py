"""Architectures of flux-mini and dit-mini: the untrained pipelines `scripts/train_minimodels.py` trains.

Both are the real diffusers classes (`FluxPipeline`, `DiTPipeline`) at a small scale, so every knob
fluxtune applies (quantization, caches, offload, compile, ...) meets the same module types as on
FLUX.1-dev or DiT-XL/2. They draw 64x64 pictures of the domain in `domain.py` and share one VAE
architecture (16x16x4 latents).
"""

from __future__ import annotations

from typing import Any

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DiTPipeline,
    DiTTransformer2DModel,
    FlowMatchEulerDiscreteScheduler,
    FluxPipeline,
    FluxTransformer2DModel,
)
from transformers import CLIPTextConfig, CLIPTextModel, T5Config, T5EncoderModel

from fluxtune.minimodels.domain import id2label

IMAGE_SIZE = 64
LATENT_CHANNELS = 4
VAE_SCALE = 4  # 2 ** (len(block_out_channels) - 1)
LATENT_SIZE = IMAGE_SIZE // VAE_SCALE
# T5 tokens a caption can need (char-level: one per character plus word marks and </s>); flux-mini is
# trained on text sequences padded to random lengths between this and 512, so any
# `max_sequence_length` in that range works (shorter is faster: most of the tokens are padding).
MIN_SEQUENCE_LENGTH = 96

VAE_CONFIG: dict[str, Any] = {
    "in_channels": 3,
    "out_channels": 3,
    "down_block_types": ("DownEncoderBlock2D",) * 3,
    "up_block_types": ("UpDecoderBlock2D",) * 3,
    "block_out_channels": (16, 32, 32),
    "layers_per_block": 1,
    "act_fn": "silu",
    "latent_channels": LATENT_CHANNELS,
    "norm_num_groups": 8,
    "sample_size": IMAGE_SIZE,
    # Replaced by the measured latent statistics after the VAE is trained (FluxPipeline decodes
    # latents / scaling_factor + shift_factor, so both must be set).
    "scaling_factor": 1.0,
    "shift_factor": 0.0,
    "use_quant_conv": False,
    "use_post_quant_conv": False,
    "mid_block_add_attention": False,
}

FLUX_TRANSFORMER_CONFIG: dict[str, Any] = {
    "patch_size": 1,
    "in_channels": LATENT_CHANNELS * 4,  # FluxPipeline packs 2x2 latent patches into tokens
    "out_channels": None,
    "num_layers": 2,
    "num_single_layers": 4,
    "attention_head_dim": 32,
    "num_attention_heads": 3,
    "joint_attention_dim": 64,  # = T5 d_model
    "pooled_projection_dim": 96,  # = CLIP hidden_size (FluxPipeline uses CLIP's pooler_output)
    "guidance_embeds": False,  # like FLUX.1-schnell; true CFG works through negative_prompt
    "axes_dims_rope": (4, 14, 14),  # sums to attention_head_dim
}

CLIP_CONFIG: dict[str, Any] = {
    "hidden_size": 96,
    "intermediate_size": 192,
    "projection_dim": 96,
    "num_hidden_layers": 3,
    "num_attention_heads": 4,
    "max_position_embeddings": 77,
    "hidden_act": "quick_gelu",
    "layer_norm_eps": 1e-5,
    "attention_dropout": 0.0,
    "dropout": 0.0,
}

T5_CONFIG: dict[str, Any] = {
    "d_model": 64,
    "d_kv": 16,
    "d_ff": 128,
    "num_layers": 3,
    "num_decoder_layers": 0,
    "num_heads": 4,
    "relative_attention_num_buckets": 32,
    "relative_attention_max_distance": 128,
    "dropout_rate": 0.0,
    "layer_norm_epsilon": 1e-6,
    "feed_forward_proj": "gated-gelu",
    "is_encoder_decoder": False,
    "tie_word_embeddings": False,
}

# No dynamic shifting: the pipeline's `mu` is then ignored and the sigmas are
# shift * s / (1 + (shift - 1) * s) for s = linspace(1, 1/N, N), the schedule the trainer samples from.
FLOW_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "shift": 1.0,
    "use_dynamic_shifting": False,
}

DIT_TRANSFORMER_CONFIG: dict[str, Any] = {
    "sample_size": LATENT_SIZE,
    "patch_size": 2,
    "in_channels": LATENT_CHANNELS,
    "out_channels": LATENT_CHANNELS,  # epsilon only (no learned sigma)
    "num_layers": 6,
    "attention_head_dim": 32,
    "num_attention_heads": 3,
    # DiTPipeline hard-codes the null class id as 1000, so the label table must have 1000 (+1) rows.
    "num_embeds_ada_norm": 1000,
    "norm_type": "ada_norm_zero",
    "norm_elementwise_affine": False,
    "attention_bias": True,
    "activation_fn": "gelu-approximate",
    "dropout": 0.0,
}

DDIM_SCHEDULER_CONFIG: dict[str, Any] = {
    "num_train_timesteps": 1000,
    "beta_schedule": "linear",
    "beta_start": 0.0001,
    "beta_end": 0.02,
    "prediction_type": "epsilon",
    "clip_sample": False,
    # "trailing" starts sampling at t=999 whatever the step count, so few-step runs start from noise.
    "timestep_spacing": "trailing",
    "set_alpha_to_one": True,
}


def _tokenizers() -> tuple[Any, Any]:
    from fluxtune.pipelines import make_clip_tokenizer, make_t5_tokenizer

    return make_clip_tokenizer(), make_t5_tokenizer()


def build_vae(seed: int = 0, **overrides: Any) -> AutoencoderKL:
    """The untrained mini VAE (64x64x3 <-> 16x16x4)."""
    torch.manual_seed(seed)
    return AutoencoderKL(**(VAE_CONFIG | overrides))


def build_text_encoders(
    clip_tokenizer: Any, t5_tokenizer: Any, seed: int = 0
) -> tuple[CLIPTextModel, T5EncoderModel]:
    """Untrained CLIP and T5 encoders sized for the given (char-level) tokenizers."""
    torch.manual_seed(seed)
    clip = CLIPTextModel(
        CLIPTextConfig(
            **CLIP_CONFIG,
            vocab_size=len(clip_tokenizer),
            bos_token_id=clip_tokenizer.bos_token_id,
            # CLIP pools at the first eos token (any id but the legacy 2), so it must be the tokenizer's
            eos_token_id=clip_tokenizer.eos_token_id,
            pad_token_id=clip_tokenizer.pad_token_id,
        )
    )
    special = {
        "pad_token_id": t5_tokenizer.pad_token_id,
        "eos_token_id": t5_tokenizer.eos_token_id,
        "decoder_start_token_id": t5_tokenizer.pad_token_id,
    }
    t5 = T5EncoderModel(T5Config(**T5_CONFIG, vocab_size=len(t5_tokenizer), **special))
    return clip, t5


def build_flux_mini(vae: AutoencoderKL | None = None, seed: int = 0) -> FluxPipeline:
    """The untrained flux-mini pipeline (FluxPipeline with small VAE, CLIP, T5 and transformer)."""
    clip_tok, t5_tok = _tokenizers()
    clip, t5 = build_text_encoders(clip_tok, t5_tok, seed=seed)
    torch.manual_seed(seed)
    transformer = FluxTransformer2DModel(**FLUX_TRANSFORMER_CONFIG)
    return FluxPipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(**FLOW_SCHEDULER_CONFIG),
        vae=vae if vae is not None else build_vae(seed),
        text_encoder=clip,
        tokenizer=clip_tok,
        text_encoder_2=t5,
        tokenizer_2=t5_tok,
        transformer=transformer,
    )


def build_dit_mini(vae: AutoencoderKL | None = None, seed: int = 0) -> DiTPipeline:
    """The untrained dit-mini pipeline (class-conditional DiT on the same latents); labels such as
    "red circle" resolve through `pipe.get_label_ids`."""
    torch.manual_seed(seed)
    transformer = DiTTransformer2DModel(**DIT_TRANSFORMER_CONFIG)
    labels = id2label()
    pipe = DiTPipeline(
        transformer=transformer,
        vae=vae if vae is not None else build_vae(seed),
        scheduler=DDIMScheduler(**DDIM_SCHEDULER_CONFIG),
        id2label=labels,
    )
    # DiTPipeline does not record id2label itself; in the config it is written to model_index.json
    # and handed back to __init__ by from_pretrained (as hub DiT checkpoints do).
    pipe.register_to_config(id2label={str(k): v for k, v in labels.items()})  # type: ignore[attr-defined]
    return pipe


def param_count(module: Any) -> int:
    """Number of parameters of a module."""
    return sum(p.numel() for p in module.parameters())
