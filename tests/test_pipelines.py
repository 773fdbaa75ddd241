"""fluxtune.pipelines: built-ins, load(), and the replica configs (on meta here, for real on the GPU)."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch

from fluxtune import pipelines
from fluxtune.errors import PipelineError, UnsupportedHardwareError
from fluxtune.pipelines import BuiltinSpec, family, load

FLUX_TRANSFORMER_PARAMS = 11_901_408_320
T5_XXL_PARAMS = 4_762_310_656
CLIP_L_PARAMS = 123_060_480
FLUX_VAE_PARAMS = 83_819_683
DIT_XL_2_PARAMS = 749_826_464
SD_VAE_PARAMS = 83_653_863


def n_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def flux_images(pipe: Any, prompt: str = "a red fox in the snow", seed: int = 0, **kwargs: Any) -> torch.Tensor:
    generator = torch.Generator().manual_seed(seed)
    out = pipe(prompt, num_inference_steps=2, output_type="pt", generator=generator, max_sequence_length=32,
               **kwargs)
    return out.images


def dit_images(pipe: Any, seed: int = 0) -> torch.Tensor:
    out = pipe(class_labels=[1, 207], num_inference_steps=2, output_type="pt",
               generator=torch.Generator().manual_seed(seed))
    return out.images


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """Tiny models gain nothing from intra-op threads, and on a shared small CI box OpenMP spinning
    against other processes made each 2-step call ~20x slower."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def tiny_flux() -> Any:
    return load("tiny-flux", dtype="float32")


@pytest.fixture(scope="module")
def tiny_dit() -> Any:
    return load("tiny-dit", dtype="float32")


# ------------------------------------------------------------------------------------------ registry


def test_builtins_are_registered() -> None:
    specs = {spec.name: spec for spec in pipelines.list_builtins()}
    expected = {"tiny-flux": ("flux", False), "tiny-dit": ("dit", False), "flux-dev-replica": ("flux", True),
                "flux-schnell-replica": ("flux", True), "dit-xl-2-256": ("dit", True),
                "dit-xl-2-512": ("dit", True)}
    for name, (fam, gpu) in expected.items():
        assert (specs[name].family, specs[name].needs_gpu) == (fam, gpu), name
        assert specs[name].description


def test_register_builtin(monkeypatch: pytest.MonkeyPatch, tiny_dit: Any) -> None:
    monkeypatch.setattr(pipelines, "BUILTINS", dict(pipelines.BUILTINS))
    calls: list[tuple[Any, Any]] = []

    def build(device: str | None = None, dtype: str = "float32") -> Any:
        calls.append((device, dtype))
        return tiny_dit

    spec = pipelines.register_builtin(BuiltinSpec("my-model", "dit", "test model", build))
    assert spec in pipelines.list_builtins()
    assert load("my-model", dtype="fp16") is tiny_dit
    assert calls == [(None, "fp16")]
    with pytest.raises(PipelineError, match="already registered"):
        pipelines.register_builtin(BuiltinSpec("my-model", "dit", "other", lambda **kw: None))
    with pytest.raises(PipelineError, match="invalid"):
        pipelines.register_builtin(BuiltinSpec("org/model", "dit", "slash reads as a hub id", build))
    with pytest.raises(PipelineError, match="family"):
        pipelines.register_builtin(BuiltinSpec("sd", "unet", "x", build))  # type: ignore[arg-type]


# ------------------------------------------------------------------------------------------ tiny-flux


def test_tiny_flux_generates_from_text(tiny_flux: Any) -> None:
    assert family(tiny_flux) == "flux"
    assert tiny_flux.text_encoder is not None and tiny_flux.text_encoder_2 is not None
    images = flux_images(tiny_flux)
    assert images.shape == (1, 3, 64, 64)  # the built-in's default size
    assert torch.isfinite(images).all()
    assert images.min() >= 0.0 and images.max() <= 1.0
    assert images.std() > 0


def test_tiny_flux_default_size_is_small_multiple_of_16(tiny_flux: Any) -> None:
    side = tiny_flux.default_sample_size * tiny_flux.vae_scale_factor
    assert side % 16 == 0 and side <= 64
    assert tiny_flux.vae_scale_factor == 8  # same latent geometry as FLUX.1-dev
    assert tiny_flux.vae.config.shift_factor is not None


def test_tiny_flux_is_conditioned_and_seeded(tiny_flux: Any) -> None:
    a = flux_images(tiny_flux, "a red fox in the snow", seed=0)
    assert torch.equal(a, flux_images(tiny_flux, "a red fox in the snow", seed=0))
    assert not torch.allclose(a, flux_images(tiny_flux, "A BLUE CAR, 1999!", seed=0))
    assert not torch.allclose(a, flux_images(tiny_flux, "a red fox in the snow", seed=1))


def test_tiny_flux_other_sizes(tiny_flux: Any) -> None:
    images = flux_images(tiny_flux, height=32, width=48)
    assert images.shape == (1, 3, 32, 48)


def test_tiny_builder_is_deterministic_and_keeps_global_rng() -> None:
    state = torch.get_rng_state()
    a = pipelines.BUILTINS["tiny-flux"].builder()
    assert torch.equal(state, torch.get_rng_state())
    b = pipelines.BUILTINS["tiny-flux"].builder()
    for name, module in pipelines.module_components(a).items():
        other = pipelines.module_components(b)[name].state_dict()
        assert all(torch.equal(t, other[k]) for k, t in module.state_dict().items()), name


def test_tiny_flux_bf16_is_the_fp32_model_rounded(tiny_flux: Any) -> None:
    pipe = load("tiny-flux", dtype="bf16")
    assert {m.dtype for m in pipelines.module_components(pipe).values()} == {torch.bfloat16}
    w16 = pipe.transformer.x_embedder.weight
    assert torch.equal(w16, tiny_flux.transformer.x_embedder.weight.to(torch.bfloat16))
    assert torch.isfinite(flux_images(pipe)).all()


# ------------------------------------------------------------------------------------------- tiny-dit


def test_tiny_dit_generates_from_class_labels(tiny_dit: Any) -> None:
    assert family(tiny_dit) == "dit"
    images = dit_images(tiny_dit)
    side = tiny_dit.transformer.config.sample_size * 8
    assert images.shape == (2, 3, side, side)
    assert torch.isfinite(images).all()
    assert torch.equal(images, dit_images(tiny_dit))
    assert not torch.allclose(images[0], images[1])  # different classes, different images


# ----------------------------------------------------------------------------------- save/load round trip


@pytest.mark.parametrize("name", ["tiny-flux", "tiny-dit"])
def test_save_pretrained_load_round_trip(name: str, tmp_path: Path, tiny_flux: Any, tiny_dit: Any) -> None:
    pipe = tiny_flux if name == "tiny-flux" else tiny_dit
    pipe.save_pretrained(tmp_path)
    loaded = load(str(tmp_path), dtype="float32")
    assert type(loaded) is type(pipe)
    assert family(loaded) == family(pipe)
    if name == "tiny-flux":
        # default_sample_size is not saved by diffusers: pass the size explicitly
        expected, got = flux_images(pipe, height=64, width=64), flux_images(loaded, height=64, width=64)
    else:
        expected, got = dit_images(pipe), dit_images(loaded)
    # The same weights, but loaded tensors may sit in another memory layout, which changes the CPU
    # matmul's summation order (seen: 1e-6 with transformers 5.24); a broken load differs by far more.
    torch.testing.assert_close(got, expected, atol=1e-5, rtol=0)


def test_load_local_dir_with_dtype(tmp_path: Path, tiny_dit: Any) -> None:
    tiny_dit.save_pretrained(tmp_path)
    loaded = load(str(tmp_path), dtype="bfloat16")
    assert loaded.transformer.dtype == torch.bfloat16


def test_load_broken_local_dir(tmp_path: Path) -> None:
    (tmp_path / "model_index.json").write_text("{not json")
    with pytest.raises(PipelineError, match="could not load a pipeline from directory"):
        load(str(tmp_path))


# ---------------------------------------------------------------------------------------------- errors


def test_unknown_name_lists_builtins() -> None:
    with pytest.raises(PipelineError, match="unknown model 'flux-dev'") as err:
        load("flux-dev")
    assert "tiny-flux" in str(err.value) and "flux-dev-replica" in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("bad", ["float8", "int8", "", "bfloat"])
def test_bad_dtype(bad: str) -> None:
    with pytest.raises(PipelineError, match=r"dtype=.*bfloat16 \(bf16\), float16 \(fp16\) or float32"):
        load("tiny-flux", dtype=bad)


@pytest.mark.parametrize(("name", "expected"), [("bf16", torch.bfloat16), ("Float16", torch.float16),
                                                ("fp32", torch.float32), (torch.bfloat16, torch.bfloat16)])
def test_parse_dtype(name: Any, expected: torch.dtype) -> None:
    assert pipelines.parse_dtype(name) is expected


def test_unreachable_hub_id(monkeypatch: pytest.MonkeyPatch) -> None:
    import huggingface_hub.constants

    # huggingface_hub reads HF_HUB_OFFLINE at import time, so set the constant too.
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(PipelineError) as err:
        load("black-forest-labs/FLUX.1-dev")
    msg = str(err.value)
    assert "'black-forest-labs/FLUX.1-dev' could not be downloaded" in msg
    assert "tiny-flux" in msg and "save_pretrained" in msg
    assert "\n" not in msg


def test_missing_local_path() -> None:
    with pytest.raises(PipelineError, match="does not exist"):
        load("./no/such/model")


def test_file_is_not_a_pipeline(tmp_path: Path) -> None:
    f = tmp_path / "flux.safetensors"
    f.write_bytes(b"")
    with pytest.raises(PipelineError, match="is a file"):
        load(str(f))


def test_bad_kwargs() -> None:
    with pytest.raises(PipelineError, match="torch_dtype"):
        load("tiny-flux", torch_dtype=torch.float32)
    with pytest.raises(PipelineError, match="does not take variant"):
        load("tiny-flux", variant="fp16")
    with pytest.raises(PipelineError, match="device="):
        load("tiny-flux", device="gpu0")


# ------------------------------------------------------------------------------------------ inspection


def test_denoiser_and_module_components(tiny_flux: Any) -> None:
    assert pipelines.denoiser(tiny_flux) is tiny_flux.transformer
    comps = pipelines.module_components(tiny_flux)
    assert list(comps) == [k for k in tiny_flux.components if k in {"vae", "text_encoder", "text_encoder_2",
                                                                      "transformer"}]
    assert all(isinstance(m, torch.nn.Module) for m in comps.values())


def test_module_components_skips_none_and_family_other() -> None:
    from diffusers import FluxPipeline

    full = pipelines.BUILTINS["tiny-flux"].builder()
    bare = FluxPipeline(scheduler=full.scheduler, vae=full.vae, text_encoder=None, tokenizer=None,
                        text_encoder_2=None, tokenizer_2=None, transformer=full.transformer)
    assert list(pipelines.module_components(bare)) == ["vae", "transformer"]
    assert family(object()) == "other"
    with pytest.raises(PipelineError, match="no transformer or unet"):
        pipelines.denoiser(object())


def test_tokenizers() -> None:
    clip = pipelines.make_clip_tokenizer()
    t5 = pipelines.make_t5_tokenizer(model_max_length=64)
    assert len(clip) == 514 and clip.model_max_length == 77
    assert len(t5) <= 100 and t5.model_max_length == 64
    ids = t5("A cat, 42!")["input_ids"]
    assert t5.unk_token_id not in ids and ids[-1] == t5.eos_token_id
    assert clip("a cat")["input_ids"][0] == clip.bos_token_id


# ------------------------------------------------------------------------------------------- replicas


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a CPU-only machine")
@pytest.mark.parametrize("name", ["flux-dev-replica", "dit-xl-2-256"])
def test_replicas_need_a_gpu(name: str) -> None:
    with pytest.raises(UnsupportedHardwareError, match=f"{name} is built on a CUDA GPU.*tiny-"):
        load(name)


def test_flux_dev_transformer_config_on_meta() -> None:
    from diffusers import FluxTransformer2DModel

    with torch.device("meta"):
        transformer = FluxTransformer2DModel(**pipelines.FLUX_DEV_TRANSFORMER_CONFIG)
    assert n_params(transformer) == FLUX_TRANSFORMER_PARAMS


def test_dit_xl_2_config_on_meta() -> None:
    from diffusers import DiTTransformer2DModel

    with torch.device("meta"):
        transformer = DiTTransformer2DModel(**pipelines.dit_xl_2_config(256))
    assert n_params(transformer) == DIT_XL_2_PARAMS
    with pytest.raises(PipelineError, match="use 256 or 512"):
        pipelines.dit_xl_2_config(1024)


def test_flux_replica_builder_on_meta() -> None:
    before = torch.get_default_dtype()
    pipe = load("flux-dev-replica", device="meta")
    assert torch.get_default_dtype() is before  # the bf16 default did not leak
    counts = {name: n_params(m) for name, m in pipelines.module_components(pipe).items()}
    # T5 would be 131M larger if the builder forgot tie_weights() after skipping init
    assert counts == {"vae": FLUX_VAE_PARAMS, "text_encoder": CLIP_L_PARAMS, "text_encoder_2": T5_XXL_PARAMS,
                      "transformer": FLUX_TRANSFORMER_PARAMS}
    assert {m.dtype for m in pipelines.module_components(pipe).values()} == {torch.bfloat16}
    assert len(pipe.tokenizer) <= pipe.text_encoder.config.vocab_size
    assert len(pipe.tokenizer_2) <= pipe.text_encoder_2.config.vocab_size
    schnell = load("flux-schnell-replica", device="meta")
    assert not schnell.transformer.config.guidance_embeds
    assert not schnell.scheduler.config.use_dynamic_shifting


@pytest.mark.parametrize("resolution", [256, 512])
def test_dit_replica_builder_on_meta(resolution: int) -> None:
    pipe = load(f"dit-xl-2-{resolution}", device="meta")
    assert n_params(pipe.transformer) == DIT_XL_2_PARAMS
    assert n_params(pipe.vae) == SD_VAE_PARAMS
    assert pipe.transformer.config.sample_size * 8 == resolution


def test_uninitialized_route_keeps_computed_buffers() -> None:
    """The replica route (default device + no init) must keep buffers that meta + to_empty loses."""
    from diffusers import DiTTransformer2DModel
    from transformers import CLIPTextConfig, CLIPTextModel

    small = {**pipelines.dit_xl_2_config(256), "num_layers": 1, "num_attention_heads": 2, "attention_head_dim": 8}
    reference = DiTTransformer2DModel(**small)
    with pipelines._uninitialized(torch.device("cpu"), torch.bfloat16):
        dit = DiTTransformer2DModel(**small)
        clip = CLIPTextModel(CLIPTextConfig(vocab_size=600, hidden_size=32, intermediate_size=37, num_hidden_layers=1,
                                            num_attention_heads=4, projection_dim=32))
    assert torch.get_default_dtype() is torch.float32
    assert dit.transformer_blocks[0].attn1.to_q.weight.dtype is torch.bfloat16
    assert dit.pos_embed.pos_embed.dtype is torch.float32
    assert torch.equal(dit.pos_embed.pos_embed, reference.pos_embed.pos_embed)
    assert torch.equal(clip.embeddings.position_ids, torch.arange(77)[None])
    pipelines._fill_random_(dit, seed=0)
    assert all(torch.isfinite(p).all() for p in dit.parameters())


def test_uninitialized_restores_dtype_on_error() -> None:
    with pytest.raises(RuntimeError), pipelines._uninitialized(torch.device("cpu"), torch.bfloat16):
        raise RuntimeError("boom")
    assert torch.get_default_dtype() is torch.float32


# -------------------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_flux_dev_replica_on_gpu() -> None:
    pipe = load("flux-dev-replica")
    comps = pipelines.module_components(pipe)
    assert n_params(comps["transformer"]) == FLUX_TRANSFORMER_PARAMS
    assert n_params(comps["text_encoder_2"]) == T5_XXL_PARAMS
    assert n_params(comps["text_encoder"]) == CLIP_L_PARAMS
    assert n_params(comps["vae"]) == FLUX_VAE_PARAMS
    assert all(p.device.type == "cuda" and p.dtype == torch.bfloat16 for m in comps.values() for p in m.parameters())
    assert torch.equal(pipe.text_encoder.embeddings.position_ids.cpu(), torch.arange(77)[None])
    assert torch.get_default_dtype() is torch.float32
    out = pipe("a photo of a cat", height=256, width=256, num_inference_steps=2, output_type="pt",
               generator=torch.Generator("cuda").manual_seed(0))
    assert out.images.shape == (1, 3, 256, 256) and torch.isfinite(out.images).all()


@pytest.mark.gpu
def test_dit_xl_2_replica_on_gpu() -> None:
    from diffusers import DiTTransformer2DModel

    pipe = load("dit-xl-2-256")
    assert n_params(pipe.transformer) == DIT_XL_2_PARAMS
    reference = DiTTransformer2DModel(**{**pipelines.dit_xl_2_config(256), "num_layers": 1})
    assert torch.equal(pipe.transformer.pos_embed.pos_embed.cpu(), reference.pos_embed.pos_embed)
    out = pipe(class_labels=[1, 2], num_inference_steps=2, output_type="pt",
               generator=torch.Generator("cuda").manual_seed(0))
    assert out.images.shape == (2, 3, 256, 256) and torch.isfinite(out.images).all()


def test_replica_route_runs_on_cpu_with_small_configs(monkeypatch: pytest.MonkeyPatch) -> None:
    """The GPU replica code path (no init, tie, fill, assemble) end to end, shrunk to fit a CPU test."""
    monkeypatch.setattr(pipelines, "FLUX_DEV_TRANSFORMER_CONFIG", {
        **pipelines.FLUX_DEV_TRANSFORMER_CONFIG, "num_layers": 1, "num_single_layers": 1, "attention_head_dim": 16,
        "num_attention_heads": 2, "joint_attention_dim": 32, "pooled_projection_dim": 32, "axes_dims_rope": (4, 4, 8),
    })
    monkeypatch.setattr(pipelines, "FLUX_VAE_CONFIG", {
        **pipelines.FLUX_VAE_CONFIG, "block_out_channels": (8, 8, 8, 8), "layers_per_block": 1, "norm_num_groups": 4,
    })
    monkeypatch.setattr(pipelines, "CLIP_L_CONFIG", {
        **pipelines.CLIP_L_CONFIG, "vocab_size": 600, "hidden_size": 32, "intermediate_size": 37, "projection_dim": 32,
        "num_hidden_layers": 1, "num_attention_heads": 4,
    })
    monkeypatch.setattr(pipelines, "T5_XXL_CONFIG", {
        **pipelines.T5_XXL_CONFIG, "vocab_size": 128, "d_model": 32, "d_kv": 8, "d_ff": 37, "num_layers": 1,
        "num_heads": 4,
    })
    pipe = load("flux-dev-replica", device="cpu", dtype="float32")
    t5 = pipe.text_encoder_2
    assert t5.shared.weight is t5.encoder.embed_tokens.weight
    assert torch.equal(pipe.text_encoder.embeddings.position_ids, torch.arange(77)[None])
    norm = pipe.text_encoder.final_layer_norm
    assert torch.equal(norm.weight, torch.ones_like(norm.weight))
    weights = pipe.transformer.x_embedder.weight
    assert 0.015 < weights.std() < 0.025  # N(0, 0.02), not torch.empty garbage
    images = flux_images(pipe, height=64, width=64)
    assert images.shape == (1, 3, 64, 64) and torch.isfinite(images).all()
    again = load("flux-dev-replica", device="cpu", dtype="float32")
    assert torch.equal(again.transformer.x_embedder.weight, weights)  # seeded fill
