"""The 2026 families whose text encoders are LLMs: FLUX.2 [klein] (Qwen3), FLUX.2 [dev] (Mistral-3) and
Qwen-Image (Qwen2.5-VL), as tiny variants for CPU tests and full-size replicas for the GPU.

The tiny ones are the real diffusers classes (``Flux2KleinPipeline``: Flux2Transformer2DModel, AutoencoderKLFlux2,
Qwen3ForCausalLM; ``QwenImagePipeline``: QwenImageTransformer2DModel, AutoencoderKLQwenImage,
Qwen2_5_VLForConditionalGeneration) at a few hundred thousand random parameters, built in memory with a
byte-level Qwen tokenizer, so ``fluxtune search``, ``apply`` and the ``from_pretrained`` path run on
them without a download. Their images mean nothing; their structure is the real one:

* Klein stacks the hidden states of text-encoder layers 9, 18 and 27 (so the encoder has 36 layers, as
  Qwen3-4B does, and the transformer's ``joint_attention_dim`` is three times its width), wraps the
  prompt in a Qwen3 chat turn with thinking off, and packs 2x2 latent pixels in the VAE.
* FLUX.2 [dev] stacks Mistral-3's layers 10, 20 and 30 (its tiny encoder keeps the real 40 layers) of a
  prompt in Mistral's chat format after a fixed system message; the tokenizer merges that message's words
  so the user's prompt fits a short max_sequence_length. (Its processor, PixtralProcessor, needs
  torchvision for images: text-to-image only calls ``apply_chat_template``, which the tokenizer has.)
* Qwen-Image drops the first 34 ids of its prompt template (the system prefix with the real Qwen2.5
  vocabulary): the tokenizer merges that template's words so the prefix is 34 ids here too.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from fluxtune.errors import PipelineError

if TYPE_CHECKING:
    from diffusers import DiffusionPipeline
    from transformers import Qwen2Tokenizer

QWEN_SPECIAL_TOKENS = (
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>", "<|vision_end|>",
    "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>", "<think>", "</think>",
)
"""The special tokens of the Qwen2.5/Qwen3 tokenizers (their names; the ids here are this vocabulary's)."""

QWEN_CHAT_TEMPLATE = (
    "{%- for message in messages %}"
    "{{- '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{%- endfor %}"
    "{%- if add_generation_prompt %}{{- '<|im_start|>assistant\\n' }}"
    "{%- if enable_thinking is defined and enable_thinking is false %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}"
    "{%- endif %}"
)
"""The part of Qwen3's chat template Flux2KleinPipeline uses (a user turn, the assistant prompt, no thinking)."""

def _word_merges(pre: Any, text: str, vocab: dict[str, int]) -> list[tuple[str, str]]:
    """BPE merges (prefix chains) that make every word of ``text``, split by the pre-tokenizer ``pre``,
    one token; the merged tokens are added to ``vocab``."""
    merges: list[tuple[str, str]] = []
    for word, _ in pre.pre_tokenize_str(text):
        for i in range(2, len(word) + 1):
            pair = (word[: i - 1], word[i - 1])
            if pair not in merges:
                merges.append(pair)
                vocab.setdefault(pair[0] + pair[1], len(vocab))
    return merges


def make_qwen_tokenizer(merge_text: str = "", model_max_length: int = 32768) -> Qwen2Tokenizer:
    """A Qwen2 byte-level BPE tokenizer built in memory: the 256 byte characters, the Qwen special tokens
    and the chat template; every word of ``merge_text`` becomes one token (prefix-chain merges)."""
    from tokenizers import AddedToken
    from tokenizers.pre_tokenizers import ByteLevel
    from transformers import Qwen2Tokenizer

    vocab: dict[str, int] = {}
    for ch in sorted(ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    for tok in QWEN_SPECIAL_TOKENS:
        vocab.setdefault(tok, len(vocab))
    merges: list[tuple[str, str]] = []
    if merge_text:
        # Split the text the way this tokenizer will (Qwen2's regex, then byte-level characters).
        pre: Any = Qwen2Tokenizer(vocab=dict(vocab), merges=[])._tokenizer.pre_tokenizer  # type: ignore[union-attr,attr-defined]
        for special in QWEN_SPECIAL_TOKENS:
            merge_text = merge_text.replace(special, "\n")
        merges = _word_merges(pre, merge_text, vocab)
    # transformers' stubs say merges are "a b" strings and unk_token a string; pairs and None are what it
    # takes at run time (and what the Qwen tokenizers have: no unknown token).
    tokenizer = Qwen2Tokenizer(vocab=vocab, merges=merges, unk_token=None,  # type: ignore[arg-type]
                               bos_token=None, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                               model_max_length=model_max_length)
    tokenizer.add_tokens([AddedToken(t, special=True, normalized=False) for t in QWEN_SPECIAL_TOKENS],
                         special_tokens=True)
    tokenizer.chat_template = QWEN_CHAT_TEMPLATE
    return tokenizer


def _flow_scheduler(**overrides: Any) -> Any:
    from diffusers import FlowMatchEulerDiscreteScheduler

    cfg: dict[str, Any] = dict(num_train_timesteps=1000, use_dynamic_shifting=True, base_shift=0.5,
                               base_image_seq_len=256, time_shift_type="exponential")
    return FlowMatchEulerDiscreteScheduler(**{**cfg, **overrides})


def build_tiny_flux2_klein(device: str | None = None, dtype: str = "float32", *, seed: int = 0) -> DiffusionPipeline:
    """tiny-flux2-klein: a Flux2KleinPipeline (step-distilled) with a 36-layer tiny Qwen3 encoder; 64x64."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from fluxtune.pipelines import _move, _resolve_device, _seeded, parse_dtype

    dev, torch_dtype = _resolve_device(device, "cpu"), parse_dtype(dtype)
    width, layers = 32, (9, 18, 27)  # Flux2KleinPipeline's default text_encoder_out_layers
    with _seeded(seed):
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=len(layers) * width, timestep_guidance_channels=32,
            mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4), rope_theta=2000,
            guidance_embeds=False,  # klein passes no guidance
        )
        vae = AutoencoderKLFlux2(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
            sample_size=64, patch_size=(2, 2),  # 4 latent channels x 2x2 = the transformer's 16
        )
        text_encoder = Qwen3ForCausalLM(Qwen3Config(
            vocab_size=256 + len(QWEN_SPECIAL_TOKENS), hidden_size=width, intermediate_size=64, num_hidden_layers=36,
            num_attention_heads=2, num_key_value_heads=1, head_dim=16, max_position_embeddings=1024,
            tie_word_embeddings=True, rope_parameters={"rope_type": "default", "rope_theta": 1e6},
        ))
    for model in (transformer, vae, text_encoder):
        _move(model, dev, torch_dtype)
    # FLUX.2 [klein]'s scheduler: dynamic shifting (the pipeline always passes mu).
    pipe: Any = Flux2KleinPipeline(scheduler=_flow_scheduler(shift=3.0, max_shift=1.15, max_image_seq_len=4096),
                                   vae=vae, text_encoder=text_encoder, tokenizer=make_qwen_tokenizer(),
                                   transformer=transformer, is_distilled=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe  # type: ignore[no-any-return]


QWEN_IMAGE_TEMPLATE = (
    "<|im_start|>system\nDescribe the image by detailing the color, shape, size, texture, quantity, text, "
    "spatial relationships of the objects and background:<|im_end|>\n<|im_start|>user\n{}<|im_end|>\n"
    "<|im_start|>assistant\n"
)
"""QwenImagePipeline.prompt_template_encode (diffusers 0.42)."""


def build_tiny_qwen_image(device: str | None = None, dtype: str = "float32", *, seed: int = 0) -> DiffusionPipeline:
    """tiny-qwen-image: a QwenImagePipeline with a tiny Qwen2.5-VL encoder (vision tower included); 64x64."""
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from fluxtune.pipelines import _move, _resolve_device, _seeded, parse_dtype

    dev, torch_dtype = _resolve_device(device, "cpu"), parse_dtype(dtype)
    tokenizer = make_qwen_tokenizer(merge_text=QWEN_IMAGE_TEMPLATE)
    special = {t: 256 + i for i, t in enumerate(QWEN_SPECIAL_TOKENS)}
    width = 32
    with _seeded(seed):
        transformer = QwenImageTransformer2DModel(
            patch_size=2, in_channels=16, out_channels=4, num_layers=2, attention_head_dim=16, num_attention_heads=2,
            joint_attention_dim=width, guidance_embeds=False, axes_dims_rope=(8, 4, 4),
        )
        vae = AutoencoderKLQwenImage(base_dim=8, z_dim=4, dim_mult=[1, 2, 4, 4], num_res_blocks=1, attn_scales=[],
                                     temperal_downsample=[False, True, True], latents_mean=[0.0] * 4,
                                     latents_std=[1.0] * 4)
        text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(
            text_config=dict(vocab_size=512, hidden_size=width, intermediate_size=64, num_hidden_layers=2,
                             num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=2048,
                             # mrope_section sums to head_dim / 2 = 8
                             rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [2, 3, 3]}),
            vision_config=dict(depth=1, hidden_size=16, intermediate_size=32, num_heads=2, out_hidden_size=width,
                               fullatt_block_indexes=[0]),
            image_token_id=special["<|image_pad|>"], video_token_id=special["<|video_pad|>"],
            vision_start_token_id=special["<|vision_start|>"], vision_end_token_id=special["<|vision_end|>"],
            tie_word_embeddings=True,
        ))
    for model in (transformer, vae, text_encoder):
        _move(model, dev, torch_dtype)
    pipe: Any = QwenImagePipeline(scheduler=_flow_scheduler(shift=1.0, max_shift=0.9, max_image_seq_len=8192,
                                                            shift_terminal=0.02),
                                  vae=vae, text_encoder=text_encoder, tokenizer=tokenizer, transformer=transformer)
    prefix = len(tokenizer(pipe.prompt_template_encode.split("{}")[0]).input_ids)
    if prefix != pipe.prompt_template_encode_start_idx:  # a diffusers with another template: say so, do not draw noise
        raise PipelineError(f"tiny-qwen-image: the prompt template's prefix is {prefix} ids here and "
                            f"{type(pipe).__name__} drops {pipe.prompt_template_encode_start_idx}; update "
                            "QWEN_IMAGE_TEMPLATE to this diffusers version's template")
    pipe.set_progress_bar_config(disable=True)
    return pipe  # type: ignore[no-any-return]


# ------------------------------------------------------------------------------ full-size replicas
# Random weights at the published shapes, built on the GPU like flux-dev-replica: real speed and memory,
# no image quality. Sources (the repositories' config.json files, values checked against diffusers 0.42's
# classes): black-forest-labs/FLUX.2-klein-4B and -9B transformer/config.json; Qwen/Qwen3-4B and
# Qwen/Qwen3-8B config.json (klein's text encoders); Qwen/Qwen-Image transformer/config.json (diffusers'
# QwenImageTransformer2DModel defaults), vae/config.json (AutoencoderKLQwenImage defaults) and
# Qwen/Qwen2.5-VL-7B-Instruct config.json (its text encoder).

KLEIN_TRANSFORMER_CONFIGS: dict[str, dict[str, Any]] = {
    "4b": dict(patch_size=1, in_channels=128, num_layers=5, num_single_layers=20, attention_head_dim=128,
               num_attention_heads=24, joint_attention_dim=7680, timestep_guidance_channels=256, mlp_ratio=3.0,
               axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False),
    "9b": dict(patch_size=1, in_channels=128, num_layers=8, num_single_layers=24, attention_head_dim=128,
               num_attention_heads=32, joint_attention_dim=12288, timestep_guidance_channels=256, mlp_ratio=3.0,
               axes_dims_rope=(32, 32, 32, 32), rope_theta=2000, guidance_embeds=False),
}
QWEN3_CONFIGS: dict[str, dict[str, Any]] = {
    "4b": dict(vocab_size=151936, hidden_size=2560, intermediate_size=9728, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
               tie_word_embeddings=True, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
    "9b": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, max_position_embeddings=40960,
               tie_word_embeddings=False, rms_norm_eps=1e-6, rope_parameters={"rope_type": "default", "rope_theta": 1e6}),
}
QWEN25_VL_7B_CONFIG: dict[str, Any] = dict(
    text_config=dict(vocab_size=152064, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28,
                     num_attention_heads=28, num_key_value_heads=4, max_position_embeddings=128000, rms_norm_eps=1e-6,
                     rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]}),
    vision_config=dict(depth=32, hidden_size=1280, intermediate_size=3420, num_heads=16, out_hidden_size=3584,
                       fullatt_block_indexes=[7, 15, 23, 31], patch_size=14, spatial_merge_size=2,
                       temporal_patch_size=2, window_size=112),
    image_token_id=151655, video_token_id=151656, vision_start_token_id=151652, vision_end_token_id=151653,
    tie_word_embeddings=False,
)


def build_flux2_klein_replica(device: str | None = None, dtype: str = "bfloat16", *, size: str = "4b",
                              seed: int = 0) -> DiffusionPipeline:
    """Full-size FLUX.2 [klein] 4B or 9B (transformer, Qwen3-4B/8B text encoder, FLUX.2 VAE), random weights."""
    from diffusers import AutoencoderKLFlux2, Flux2KleinPipeline, Flux2Transformer2DModel
    from transformers import Qwen3Config, Qwen3ForCausalLM

    from fluxtune.pipelines import _fill_random_, _resolve_device, _uninitialized, parse_dtype

    dev, torch_dtype = _resolve_device(device, "cuda"), parse_dtype(dtype)
    with _uninitialized(dev, torch_dtype):
        transformer = Flux2Transformer2DModel(**KLEIN_TRANSFORMER_CONFIGS[size])
        vae = AutoencoderKLFlux2()  # the FLUX.2 VAE's published config is the class default
        text_encoder = Qwen3ForCausalLM(Qwen3Config(**QWEN3_CONFIGS[size]))
    text_encoder.tie_weights()
    models: tuple[Any, ...] = (transformer, vae, text_encoder)
    for i, model in enumerate(models):
        _fill_random_(model, seed + i)
        model.eval()
    pipe: Any = Flux2KleinPipeline(scheduler=_flow_scheduler(shift=3.0, max_shift=1.15, max_image_seq_len=4096),
                                   vae=vae, text_encoder=text_encoder, tokenizer=make_qwen_tokenizer(),
                                   transformer=transformer, is_distilled=True)
    pipe.set_progress_bar_config(disable=True)
    return pipe  # type: ignore[no-any-return]


def build_qwen_image_replica(device: str | None = None, dtype: str = "bfloat16", *, seed: int = 0) -> DiffusionPipeline:
    """Full-size Qwen-Image (20B MMDiT, Qwen2.5-VL-7B text encoder with its vision tower), random weights."""
    from diffusers import AutoencoderKLQwenImage, QwenImagePipeline, QwenImageTransformer2DModel
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    from fluxtune.pipelines import _fill_random_, _resolve_device, _uninitialized, parse_dtype

    dev, torch_dtype = _resolve_device(device, "cuda"), parse_dtype(dtype)
    with _uninitialized(dev, torch_dtype):
        transformer = QwenImageTransformer2DModel()  # Qwen-Image's published config is the class default
        vae = AutoencoderKLQwenImage()
        text_encoder = Qwen2_5_VLForConditionalGeneration(Qwen2_5_VLConfig(**QWEN25_VL_7B_CONFIG))
    models: tuple[Any, ...] = (transformer, vae, text_encoder)
    for i, model in enumerate(models):
        _fill_random_(model, seed + i)
        model.eval()
    pipe: Any = QwenImagePipeline(scheduler=_flow_scheduler(shift=1.0, max_shift=0.9, max_image_seq_len=8192,
                                                            shift_terminal=0.02),
                                  vae=vae, text_encoder=text_encoder,
                                  tokenizer=make_qwen_tokenizer(merge_text=QWEN_IMAGE_TEMPLATE), transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe  # type: ignore[no-any-return]



# ------------------------------------------------------------------------------------- FLUX.2 [dev]
MISTRAL_SPECIAL_TOKENS = (
    "<unk>", "<s>", "</s>", "[INST]", "[/INST]", "[AVAILABLE_TOOLS]", "[/AVAILABLE_TOOLS]", "[TOOL_RESULTS]",
    "[/TOOL_RESULTS]", "[TOOL_CALLS]", "[IMG]", "<pad>", "[IMG_BREAK]", "[IMG_END]", "[PREFIX]", "[MIDDLE]",
    "[SUFFIX]", "[SYSTEM_PROMPT]", "[/SYSTEM_PROMPT]", "[TOOL_CONTENT]",
)
"""Mistral's (Tekken) first 20 control tokens, at their real ids ([IMG] = 10, <pad> = 11)."""

MISTRAL_CHAT_TEMPLATE = (
    "{%- macro render(content) -%}{%- if content is string -%}{{- content -}}{%- else -%}"
    "{%- for chunk in content -%}{%- if chunk['type'] == 'text' -%}{{- chunk['text'] -}}"
    "{%- elif chunk['type'] == 'image' -%}{{- '[IMG]' -}}{%- endif -%}{%- endfor -%}{%- endif -%}{%- endmacro -%}"
    "{{- bos_token -}}{%- for message in messages -%}"
    "{%- if message['role'] == 'system' -%}{{- '[SYSTEM_PROMPT]' + render(message['content']) + '[/SYSTEM_PROMPT]' -}}"
    "{%- elif message['role'] == 'user' -%}{{- '[INST]' + render(message['content']) + '[/INST]' -}}"
    "{%- elif message['role'] == 'assistant' -%}{{- render(message['content']) + eos_token -}}{%- endif -%}"
    "{%- endfor -%}"
)
"""The part of Mistral-Small-3.1's chat template Flux2Pipeline uses (content as text chunks)."""


def make_mistral_tokenizer(model_max_length: int = 131072) -> Any:
    """A byte-level BPE tokenizer in memory with Mistral's control tokens and chat format; the words of
    Flux2Pipeline's system message are one token each (~30 tokens instead of ~170)."""
    from diffusers.pipelines.flux2.pipeline_flux2 import SYSTEM_MESSAGE
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab: dict[str, int] = {t: i for i, t in enumerate(MISTRAL_SPECIAL_TOKENS)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab.setdefault(ch, len(vocab))
    pre = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    merges = _word_merges(pre, SYSTEM_MESSAGE, vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges, unk_token=None, fuse_unk=False))
    tok.pre_tokenizer = pre
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True, normalized=False) for t in MISTRAL_SPECIAL_TOKENS])
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                   pad_token="<pad>", model_max_length=model_max_length, padding_side="right",
                                   chat_template=MISTRAL_CHAT_TEMPLATE)


def _flux2_dev_pipeline(transformer: Any, vae: Any, text_encoder: Any) -> DiffusionPipeline:
    from diffusers import Flux2Pipeline

    pipe: Any = Flux2Pipeline(scheduler=_flow_scheduler(shift=3.0, max_shift=1.15, max_image_seq_len=4096),
                              vae=vae, text_encoder=text_encoder, tokenizer=make_mistral_tokenizer(),
                              transformer=transformer)
    pipe.set_progress_bar_config(disable=True)
    return pipe  # type: ignore[no-any-return]


def build_tiny_flux2_dev(device: str | None = None, dtype: str = "float32", *, seed: int = 0) -> DiffusionPipeline:
    """tiny-flux2-dev: a Flux2Pipeline (guidance-distilled) with a 40-layer tiny Mistral-3 encoder; 64x64."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    from fluxtune.pipelines import _move, _resolve_device, _seeded, parse_dtype

    dev, torch_dtype = _resolve_device(device, "cpu"), parse_dtype(dtype)
    width = 16
    ids = {t: i for i, t in enumerate(MISTRAL_SPECIAL_TOKENS)}
    vocab = len(make_mistral_tokenizer())
    with _seeded(seed):
        transformer = Flux2Transformer2DModel(
            patch_size=1, in_channels=16, num_layers=1, num_single_layers=2, attention_head_dim=16,
            num_attention_heads=2, joint_attention_dim=3 * width,  # Flux2Pipeline stacks layers 10, 20, 30
            timestep_guidance_channels=32, mlp_ratio=3.0, axes_dims_rope=(4, 4, 4, 4), rope_theta=2000,
            guidance_embeds=True,
        )
        vae = AutoencoderKLFlux2(
            down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
            block_out_channels=(8, 8, 16, 16), layers_per_block=1, latent_channels=4, norm_num_groups=4,
            sample_size=64, patch_size=(2, 2),
        )
        text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(
            text_config=dict(model_type="mistral", vocab_size=vocab, hidden_size=width, intermediate_size=32,
                             num_hidden_layers=40, num_attention_heads=2, num_key_value_heads=1, head_dim=8,
                             max_position_embeddings=1024, rms_norm_eps=1e-5, sliding_window=None,
                             rope_parameters={"rope_type": "default", "rope_theta": 1e9}, bos_token_id=ids["<s>"],
                             eos_token_id=ids["</s>"], pad_token_id=ids["<pad>"], tie_word_embeddings=False),
            vision_config=dict(model_type="pixtral", hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                               num_attention_heads=2, head_dim=8, patch_size=4, image_size=64),
            image_token_index=ids["[IMG]"], spatial_merge_size=2, multimodal_projector_bias=False,
            tie_word_embeddings=False,  # the top level defaults to True, the text model to False: say it once
        ))
    for model in (transformer, vae, text_encoder):
        _move(model, dev, torch_dtype)
    return _flux2_dev_pipeline(transformer, vae, text_encoder)


def build_flux2_dev_replica(device: str | None = None, dtype: str = "bfloat16", *, seed: int = 0) -> DiffusionPipeline:
    """Full-size FLUX.2 [dev] (32B transformer, Mistral-Small-3.1-24B encoder with its Pixtral tower), random
    weights. Sources: diffusers' Flux2Transformer2DModel and AutoencoderKLFlux2 defaults are
    black-forest-labs/FLUX.2-dev's transformer and VAE configs; transformers' Mistral3Config defaults are
    mistralai/Mistral-Small-3.1-24B-Instruct-2503's (as its docstring says)."""
    from diffusers import AutoencoderKLFlux2, Flux2Transformer2DModel
    from transformers import Mistral3Config, Mistral3ForConditionalGeneration

    from fluxtune.pipelines import _fill_random_, _resolve_device, _uninitialized, parse_dtype

    dev, torch_dtype = _resolve_device(device, "cuda"), parse_dtype(dtype)
    with _uninitialized(dev, torch_dtype):
        transformer = Flux2Transformer2DModel()
        vae = AutoencoderKLFlux2()
        text_encoder = Mistral3ForConditionalGeneration(Mistral3Config(tie_word_embeddings=False))
    models: tuple[Any, ...] = (transformer, vae, text_encoder)
    for i, model in enumerate(models):
        _fill_random_(model, seed + i)
        model.eval()
    return _flux2_dev_pipeline(transformer, vae, text_encoder)
