"""The 2026 families (issue 19) on their tiny variants: FLUX.2 [klein] and Qwen-Image, recognised by their
pipeline classes, tuned by the same handlers, loaded from a save_pretrained directory, searched."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fluxtune
from fluxtune import pipelines
from tests.test_loading import _same

MODELS = ("tiny-flux2-klein", "tiny-flux2-dev", "tiny-qwen-image")
GEN = {"height": 64, "width": 64, "steps": 2, "max_sequence_length": 64}


def _image(pipe) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return pipe(prompt="a red fox", height=64, width=64, num_inference_steps=2, max_sequence_length=64,
                generator=torch.Generator().manual_seed(0), output_type="pt").images


@pytest.fixture(scope="module", params=MODELS)
def saved(request: pytest.FixtureRequest, tmp_path_factory: pytest.TempPathFactory) -> tuple[str, Path]:
    d = tmp_path_factory.mktemp(request.param)
    pipelines.load(request.param).save_pretrained(d)
    return request.param, d


def test_each_family_is_known_by_its_pipeline_class(saved: tuple[str, Path]) -> None:
    name, d = saved
    pipe = pipelines.load(name)
    assert pipelines.family(pipe) == pipelines.BUILTINS[name].family
    cls = json.loads((d / "model_index.json").read_text())["_class_name"]
    assert pipelines.family_of_class(cls) == pipelines.BUILTINS[name].family
    # A profile for another family is refused by name, before anything changes.
    with pytest.raises(fluxtune.FluxtuneError, match="family=flux"):
        fluxtune.apply({"family": "flux", "generation": GEN}, pipe)


def test_quantized_text_encoder_and_transformer_draw_close_to_the_plain_model(saved: tuple[str, Path]) -> None:
    name, _ = saved
    plain = pipelines.load(name)
    fluxtune.apply({"generation": GEN}, plain)
    tuned = pipelines.load(name)
    report = fluxtune.apply({"generation": GEN, "transformer": {"quantize": "int8_weight"},
                             "text_encoder": {"quantize": "int8_weight"}}, tuned)
    text = str(report)
    assert "int8_weight" in text and "text_encoder" in text
    a, b = _image(plain), _image(tuned)
    assert a.shape == b.shape == (1, 3, 64, 64)
    assert 0 < (a - b).abs().max() < 0.25  # int8 moved the pixels a little, not into noise


def test_load_from_a_directory_gives_the_images_of_from_pretrained_then_apply(saved: tuple[str, Path]) -> None:
    """Qwen-Image's text encoder is saved in transformers' older layout (model.layers.* for the module's
    model.language_model.layers.*): fluxtune.load renames keys as transformers does."""
    _, d = saved
    profile = {"generation": GEN, "transformer": {"quantize": "int8_weight"}}
    plain = pipelines.load(str(d), dtype="float32")
    fluxtune.apply(profile, plain)
    loaded = fluxtune.load(str(d), profile, dtype="float32")
    for comp, module in pipelines.module_components(plain).items():
        theirs = pipelines.module_components(loaded)[comp].state_dict()
        assert all(_same(v, theirs[k]) for k, v in module.state_dict().items()), comp
    assert (_image(plain) - _image(loaded)).abs().max() <= 1e-4


@pytest.mark.slow
@pytest.mark.parametrize("model", MODELS)
def test_search_runs_unchanged_on_each_family(model: str, tmp_path: Path) -> None:
    from tests.test_search import cli

    res = cli("search", "--model", model, "--budget", "12GB", "--trials", "3", "--patience", "0",
              "--pin", "text_encoder.quantize=[none,int8_weight]", "--home", tmp_path)
    assert res.code == 0, res.out[-3000:] + res.err[-3000:]
    assert "best: trial" in res.out
    best = (tmp_path / f"{model}-12GB-latency" / "best.yaml").read_text()
    assert f"family: {pipelines.BUILTINS[model].family}" in best


@pytest.mark.parametrize("model", MODELS)
def test_repeated_blocks_are_found_from_the_module_tree_and_stream(model: str) -> None:
    """Partial residency, regional compile and the memory model see each family's block lists: the
    transformer's (one double-stream block in tiny klein counts, as diffusers declares the class) and the
    LLM text encoder's decoder layers; streaming them on CPU draws the same image."""
    from fluxtune.tuning.streaming import BlockStreamer, repeated_blocks

    pipe = pipelines.load(model)
    blocks = {type(b).__name__ for _, b in repeated_blocks(pipe.transformer)}
    assert blocks == set(pipe.transformer._repeated_blocks)
    layers = repeated_blocks(pipe.text_encoder)
    assert layers and all(type(b).__name__.endswith("DecoderLayer") for _, b in layers)
    ref = _image(pipe)
    BlockStreamer(pipe.transformer, torch.device("cpu"), resident_blocks=1)
    BlockStreamer(pipe.text_encoder, torch.device("cpu"), resident_blocks=0)
    assert torch.equal(_image(pipe), ref)


@pytest.mark.parametrize("model,transformer_b,encoder_b", [
    ("flux2-klein-4b-replica", 3.88, 4.02),   # "4B"; Qwen3-4B
    ("flux2-klein-9b-replica", 9.08, 8.19),   # "9B"; Qwen3-8B
    ("flux2-dev-replica", 32.22, 24.01),      # "32B"; Mistral-Small-3.1-24B with its Pixtral tower
    ("qwen-image-replica", 20.43, 8.29),      # "20B MMDiT"; Qwen2.5-VL-7B with its vision tower
])
def test_full_size_replicas_have_the_published_sizes(model: str, transformer_b: float, encoder_b: float) -> None:
    """Built on the meta device (no memory): the configs give the parameter counts the model cards state."""
    from fluxtune.memory import ModelFacts

    facts = ModelFacts.for_builtin(model)
    assert facts.family == pipelines.BUILTINS[model].family and facts.pixels_per_token == 256
    assert facts.components["transformer"].params / 1e9 == pytest.approx(transformer_b, abs=0.01)
    assert facts.components["text_encoder"].params / 1e9 == pytest.approx(encoder_b, abs=0.01)
    # An LLM encoder runs the call's tokens, not its 40960-128000 positions.
    assert facts.components["text_encoder"].shape["max_tokens"] is None


@pytest.mark.parametrize("model", ["tiny-flux2-klein", "tiny-flux2-dev"])
def test_the_language_model_head_of_a_text_encoder_is_never_quantized(model: str) -> None:
    """Pipelines read the encoder's hidden states: its lm_head keeps its dtype (int8's dequantization made a
    float32 copy of Qwen3-4B's vocabulary matrix and ran the 8 GB klein profile out of memory on the H200),
    stays tied to the input embedding where it was, and the memory model charges it so."""
    from fluxtune.memory import ModelFacts
    from fluxtune.memory.model import _leaf_bytes
    from fluxtune.presets import load_profile

    pipe = pipelines.load(model)
    encoder = pipe.text_encoder
    dtype = encoder.get_output_embeddings().weight.dtype
    head, embedding = encoder.get_output_embeddings(), encoder.get_input_embeddings()
    tied = head.weight is embedding.weight
    assert tied == (model == "tiny-flux2-klein")  # Qwen3 ties them, Mistral-3 does not
    facts = ModelFacts.from_pipeline(pipe, name=model).components["text_encoder"]
    assert facts.output_embedding == "lm_head"
    profile = load_profile({"family": "flux2", "text_encoder": {"quantize": {"method": "int8_weight"}}})
    fluxtune.apply(profile, pipe)
    assert type(head.weight.data) is torch.Tensor and head.weight.dtype == dtype
    assert head.weight is embedding.weight if tied else head.weight is not embedding.weight
    assert sum(type(m.weight.data) is not torch.Tensor for m in encoder.modules() if isinstance(m, torch.nn.Linear)) > 0
    per_leaf = _leaf_bytes(profile.text_encoder, facts)
    if not tied:  # a tied head is the embedding's leaf, already at its dtype
        assert per_leaf["lm_head"] == head.weight.numel() * head.weight.element_size()
    assert all(size < head.weight.element_size() * next(x for x in facts.leaves if x.name == name).params
               for name, size in per_leaf.items() if name.endswith("mlp.down_proj"))


def test_the_memory_model_sizes_klein_4b_for_an_8gb_card() -> None:
    """Predicted, not measured: bf16 klein 4B needs about 20 GB; fp8 weights with the Qwen3 encoder in int8
    and streamed bring it near 8 GB, with the transformer partly streamed under it."""
    from fluxtune.memory import ModelFacts, predict
    from fluxtune.presets import load_profile

    facts = ModelFacts.for_builtin("flux2-klein-4b-replica")
    gen = {"height": 1024, "width": 1024, "steps": 4}
    plain = predict(load_profile({"family": "flux2", "generation": gen}), facts).peak_vram
    small = predict(load_profile({
        "family": "flux2", "generation": gen,
        "transformer": {"quantize": {"method": "fp8_dynamic"}, "offload": {"mode": "partial", "resident": "3GB"}},
        "text_encoder": {"quantize": {"method": "int8_weight"}, "offload": {"mode": "partial", "resident_blocks": 0}},
    }), facts).peak_vram
    assert 16e9 < plain < 26e9 and small < 8e9


def test_latency_prediction_for_the_new_families(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """Work counted from the FLUX.2 / Qwen-Image forwards on meta tensors; a model of another family is refused."""
    from fluxtune.cli import main
    from fluxtune.predict import count_work

    assert main(["predict", "flux-dev-12gb", "--gpu", "RTX 4060", "--model", "flux2-klein-4b-replica"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "flux2-klein-4b-replica is a flux2 model" in err[0] and "--model" in err[0]
    # Per step, two FLOPs per per-token weight and token: Qwen-Image's 60 dual-stream blocks apply 6.8 B
    # per-token weights to each of 4096 image + 512 text tokens at 1024x1024 (62.6 TFLOP).
    w = count_work("qwen-image-replica", height=1024, width=1024, max_sequence_length=512)
    assert 60e12 < w.components["transformer"].gemm_flops < 66e12
    assert set(w.components) == {"text_encoder", "transformer", "vae"}
    path = tmp_path / "k.yaml"
    path.write_text(json.dumps({"name": "k", "family": "flux2", "generation": {"height": 1024, "width": 1024, "steps": 4},
                                "transformer": {"quantize": {"method": "fp8_dynamic", "granularity": "tensor"}}}))
    assert main(["predict", str(path), "--gpu", "RTX 4090", "--model", "flux2-klein-4b-replica", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["predicted"] and out["steps"] == 4 and 0 < out["total_s"] < 30
    assert any("no flux2 run is in the fit" in a for a in out["assumptions"])


def test_vae_tiles_of_a_given_size_on_the_qwen_image_vae() -> None:
    """The Qwen-Image VAE tiles by height/width with strides, not by one square size (the 24 GB preset
    tiles it): the size lands in its attributes, the decode tiles, and a plain profile restores them."""
    pipe = pipelines.load("tiny-qwen-image")
    vae = pipe.vae
    before = {a: getattr(vae, a) for a in ("tile_sample_min_height", "tile_sample_min_width", "tile_sample_stride_height")}
    seen: list[int] = []
    original = vae.tiled_decode
    vae.tiled_decode = lambda *a, **k: (seen.append(1), original(*a, **k))[1]
    report = fluxtune.apply({"family": "qwenimage", "vae": {"tiling": True, "tile_size": 64}}, pipe)
    assert vae.use_tiling and (vae.tile_sample_min_height, vae.tile_sample_min_width, vae.tile_sample_stride_height) == (64, 64, 48)
    assert "tiles of 64px" in str(report)
    image = pipe(prompt="a red circle", height=128, width=128, num_inference_steps=2, output_type="pt",
                 generator=torch.Generator().manual_seed(0)).images
    assert seen and image.shape[-2:] == (128, 128) and torch.isfinite(image).all()
    fluxtune.apply({"family": "qwenimage"}, pipe)
    assert not vae.use_tiling and {a: getattr(vae, a) for a in before} == before


def _passes_per_step(pipe, **call) -> int:  # type: ignore[no-untyped-def]
    calls: list[int] = []
    handle = pipe.transformer.register_forward_hook(lambda *a: calls.append(1))
    try:
        pipe(prompt="a red fox", generator=torch.Generator().manual_seed(0), output_type="pt", **call)
    finally:
        handle.remove()
    return len(calls) // GEN["steps"]


def test_true_cfg_from_the_profile_runs_two_transformer_passes_a_step() -> None:
    """generation.negative_prompt makes Qwen-Image's true CFG the call's default (diffusers' own example
    passes negative_prompt=" "): twice the transformer's work a step, which predict counts too."""
    pipe = pipelines.load("tiny-qwen-image")
    fluxtune.apply({"generation": GEN}, pipe)
    assert _passes_per_step(pipe) == 1  # no negative prompt: diffusers runs one pass
    report = fluxtune.apply({"generation": {**GEN, "negative_prompt": " "}}, pipe)
    assert "true CFG" in str(report) and "negative_prompt=' '" in str(report)
    assert _passes_per_step(pipe) == 2
    assert _passes_per_step(pipe, true_cfg_scale=1.0) == 1  # the caller's argument still wins
    fluxtune.apply({"generation": {**GEN, "negative_prompt": " ", "true_cfg_scale": 2.5}}, pipe)
    assert _passes_per_step(pipe) == 2
    with pytest.raises(fluxtune.FluxtuneError, match="true_cfg_scale=1.0 runs no true CFG on QwenImagePipeline"):
        fluxtune.apply({"generation": {**GEN, "negative_prompt": " ", "true_cfg_scale": 1.0}}, pipe)
    assert _passes_per_step(pipe) == 2  # the refused profile changed nothing


def test_true_cfg_where_the_pipeline_has_none_is_refused_before_anything_changes() -> None:
    klein = pipelines.load("tiny-flux2-klein")  # step-distilled: no negative_prompt in its call
    with pytest.raises(fluxtune.FluxtuneError, match="generation.negative_prompt=' '.*Flux2KleinPipeline has no negative_prompt"):
        fluxtune.apply({"generation": {**GEN, "negative_prompt": " "}, "transformer": {"quantize": "int8_weight"}}, klein)
    assert type(klein.transformer.transformer_blocks[0].attn.to_q.weight) is torch.nn.Parameter  # not quantized
    flux = pipelines.load("tiny-flux")  # FluxPipeline's true_cfg_scale defaults to 1.0: a negative prompt alone does nothing
    with pytest.raises(fluxtune.FluxtuneError, match="true_cfg_scale=1.0 runs no true CFG on FluxPipeline"):
        fluxtune.apply({"generation": {"height": 64, "width": 64, "steps": 2, "negative_prompt": "blurry"}}, flux)


def _draw_counting_blocks(pipe, **call) -> tuple[torch.Tensor, list[int]]:  # type: ignore[no-untyped-def]
    rows: list[int] = []
    block = pipe.transformer.transformer_blocks[0]
    handle = block.register_forward_pre_hook(lambda m, a, kw: rows.append(int(kw["hidden_states"].shape[0])),
                                             with_kwargs=True)
    try:
        image = pipe(prompt="a red fox", generator=torch.Generator().manual_seed(0), output_type="pt", **call).images
    finally:
        handle.remove()
    return image, rows


@pytest.mark.parametrize("model,gen", [
    ("tiny-qwen-image", {**GEN, "negative_prompt": "blurry"}),
    ("tiny-flux", {"height": 64, "width": 64, "steps": 2, "negative_prompt": "blurry", "true_cfg_scale": 3.0}),
])
def test_batched_true_cfg_draws_the_same_image_with_one_forward_a_step(model: str, gen: dict) -> None:
    """generation.batch_cfg runs the prompt's and the negative prompt's rows as one forward (a streamed
    transformer copies its blocks once a step): the blocks see one batch of 2 a step, and the image is the
    sequential one (Qwen-Image's shorter text padded and masked, FLUX.1's T5 text the same length)."""
    pipe = pipelines.load(model)
    fluxtune.apply({"family": pipelines.BUILTINS[model].family, "generation": gen}, pipe)
    sequential, rows = _draw_counting_blocks(pipe)
    assert rows == [1, 1] * gen["steps"]
    report = fluxtune.apply({"family": pipelines.BUILTINS[model].family, "generation": {**gen, "batch_cfg": True}}, pipe)
    assert "one batch of two" in str(report)
    batched, rows = _draw_counting_blocks(pipe)
    assert rows == [2] * gen["steps"]
    assert (batched - sequential).abs().max() < 2e-3, (batched - sequential).abs().max()
    # A call that differs from the profile's runs as it is: no negative prompt, one pass a step.
    _, rows = _draw_counting_blocks(pipe, negative_prompt=None)
    assert rows == [1] * gen["steps"]
    # A plain profile takes the wrapper off again.
    fluxtune.apply({"family": pipelines.BUILTINS[model].family, "generation": gen}, pipe)
    assert "forward" not in vars(pipe.transformer) and "encode_prompt" not in vars(pipe)
    assert _draw_counting_blocks(pipe)[1] == [1, 1] * gen["steps"]


def test_batched_true_cfg_without_true_cfg_is_refused() -> None:
    qwen = pipelines.load("tiny-qwen-image")
    with pytest.raises(fluxtune.FluxtuneError, match="batch_cfg=true batches true CFG's two passes, and true CFG is off"):
        fluxtune.apply({"generation": {**GEN, "batch_cfg": True}}, qwen)
    with pytest.raises(fluxtune.FluxtuneError, match="compile.mode=full traces"):
        fluxtune.apply({"generation": {**GEN, "negative_prompt": " ", "batch_cfg": True}, "compile": {"mode": "full"}},
                       qwen)
    klein = pipelines.load("tiny-flux2-klein")
    with pytest.raises(fluxtune.FluxtuneError, match="Flux2KleinPipeline runs no true CFG"):
        fluxtune.apply({"generation": {**GEN, "batch_cfg": True}}, klein)


def test_a_negative_prompt_for_classic_cfg_is_an_ordinary_default() -> None:
    """PixArt, SD3 and the like take negative_prompt with guidance_scale (one batched forward) and have no
    true_cfg_scale: there the profile's negative prompt is a plain call default, not refused."""
    import inspect

    from fluxtune.knobs import Generation
    from fluxtune.tuning.generation import true_cfg_passes, true_cfg_problem

    def call(prompt: str, negative_prompt: str | None = None, guidance_scale: float = 4.5) -> None: ...

    params = inspect.signature(call).parameters
    g = Generation(negative_prompt="blurry")
    assert true_cfg_problem(params, g, "PixArtSigmaPipeline") is None and true_cfg_passes(params, g) == 1
    assert "has no true_cfg_scale" in str(true_cfg_problem(params, Generation(true_cfg_scale=4.0), "PixArtSigmaPipeline"))


def _tiny_pixart(sample_size: int = 8, vae_blocks: int = 1):  # type: ignore[no-untyped-def]
    """A PixArt-Sigma pipeline (no family of fluxtune's: "any diffusers DiT"), tiny, on tiny-flux's T5.
    ``sample_size=32`` with 4 VAE blocks draws 256x256 by default (PixArt's smallest resolution bins)."""
    from diffusers import (
        AutoencoderKL,
        DPMSolverMultistepScheduler,
        PixArtSigmaPipeline,
        PixArtTransformer2DModel,
    )

    flux = pipelines.load("tiny-flux", dtype="float32")
    torch.manual_seed(0)
    transformer = PixArtTransformer2DModel(
        num_attention_heads=2, attention_head_dim=8, in_channels=4, out_channels=8, num_layers=2, cross_attention_dim=16,
        caption_channels=flux.text_encoder_2.config.d_model, sample_size=sample_size, patch_size=2, norm_type="ada_norm_single",
        use_additional_conditions=False)
    vae = AutoencoderKL(block_out_channels=(8,) * vae_blocks, latent_channels=4, norm_num_groups=4,
                        down_block_types=("DownEncoderBlock2D",) * vae_blocks,
                        up_block_types=("UpDecoderBlock2D",) * vae_blocks)
    pipe = PixArtSigmaPipeline(tokenizer=flux.tokenizer_2, text_encoder=flux.text_encoder_2, vae=vae,
                               transformer=transformer, scheduler=DPMSolverMultistepScheduler())
    pipe.set_progress_bar_config(disable=True)
    return pipe


def test_a_transformer_pipeline_of_no_known_family_is_tuned_or_refused_by_name(tmp_path: Path) -> None:
    """Issue 19's "any diffusers DiT": PixArt-Sigma, which fluxtune has no family code for, gets its
    quantization, regional compile (its repeated blocks found from the module tree), VAE tiling and call
    defaults, through apply and through fluxtune.load of a save_pretrained directory; what it cannot take
    (diffusers has no cache hooks for it, true CFG) is refused in one line before anything changes."""
    pipe = _tiny_pixart()
    assert pipelines.family(pipe) == "other"
    call = {"output_type": "pt", "use_resolution_binning": False, "clean_caption": False,
            "generator": torch.Generator().manual_seed(0)}
    gen = {"steps": 2, "height": 64, "width": 64, "negative_prompt": "blurry"}
    for refused, match in (({"cache": "first_block"}, "PixArtTransformer2DModel has no cache support"),
                           ({"generation": {**gen, "batch_cfg": True}}, "PixArtSigmaPipeline runs no true CFG")):
        with pytest.raises(fluxtune.FluxtuneError, match=match):
            fluxtune.apply({"generation": gen, "transformer": {"quantize": "int8_weight"}, **refused}, pipe)
    plain = pipe("a fox", height=64, width=64, num_inference_steps=2, negative_prompt="blurry", **call).images
    profile = {"generation": gen, "transformer": {"quantize": "int8_dynamic"}, "text_encoder": {"quantize": "int8_weight"},
               "vae": {"tiling": True}, "compile": {"mode": "regional"}}
    report = str(fluxtune.apply(profile, pipe))
    assert "int8_dynamic: 26/26 Linear layers" in report and "regional: 2 blocks" in report and "tiling" in report
    tuned = pipe("a fox", **{**call, "generator": torch.Generator().manual_seed(0)}).images
    assert tuned.shape == plain.shape == (1, 3, 64, 64) and 0 < (tuned - plain).abs().max() < 0.25
    _tiny_pixart().save_pretrained(tmp_path / "pixart")
    loaded = fluxtune.load(str(tmp_path / "pixart"), {k: v for k, v in profile.items() if k != "compile"}, dtype="float32")
    again = loaded("a fox", **{**call, "generator": torch.Generator().manual_seed(0)}).images
    assert (again - plain).abs().max() < 0.25 and type(loaded.transformer).__name__ == "PixArtTransformer2DModel"


def test_search_on_a_saved_pipeline_of_no_known_family(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """`fluxtune search --model DIR` on a PixArt-Sigma directory: its base profile is family=any (it was
    flux, which apply then refused as the wrong family), caches are not proposed (diffusers has no hooks
    for its transformer), and the search measures and writes a profile."""
    from fluxtune.cli import main

    _tiny_pixart(sample_size=32, vae_blocks=4).save_pretrained(tmp_path / "pixart")
    out = tmp_path / "best.yaml"
    code = main(["search", "--model", str(tmp_path / "pixart"), "--trials", "2", "--size", "256x256", "--steps", "2",
                 "--runs", "1", "--no-descent", "--home", str(tmp_path / "home"), "--out", str(out)])
    assert code == 0
    assert "cache: none (diffusers has no cache hooks" in capsys.readouterr().out
    best = fluxtune.presets.load_profile(out)
    assert best.family == "any" and best.measured is not None and best.measured.latency_s


def _draw(pipe, family: str) -> torch.Tensor:  # type: ignore[no-untyped-def]
    if family == "dit":
        return torch.from_numpy(pipe(class_labels=[1], num_inference_steps=2, output_type="np",
                                     generator=torch.Generator().manual_seed(0)).images)
    call = ({"max_sequence_length": 64} if family in ("flux2", "qwenimage")
            else {"use_resolution_binning": False} if family == "any" else {})
    return pipe(prompt="a red fox", height=64, width=64, num_inference_steps=2, output_type="pt",
                generator=torch.Generator().manual_seed(0), **call).images.float()


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-flux2-klein", "tiny-qwen-image", "tiny-dit", "pixart"])
@pytest.mark.parametrize("component", ["transformer", "vae", "text_encoder"])
def test_components_in_two_dtypes_draw_what_one_dtype_draws(model: str, component: str) -> None:
    """A pipeline hands one component's output to the next as it is (FLUX.1 makes its latents in T5's dtype
    and decodes them uncast): without casts at the boundaries a transformer in bfloat16 beside float32 text
    encoders, or a bfloat16 VAE, stopped at the first matmul with a dtype mismatch."""
    load = _tiny_pixart if model == "pixart" else (lambda: pipelines.load(model, dtype="float32"))
    family = "any" if model == "pixart" else pipelines.BUILTINS[model].family
    if component == "text_encoder" and family == "dit":
        pytest.skip("DiT has no text encoder")
    name = "text_encoder_2" if component == "text_encoder" and model == "tiny-flux" else component
    plain = load()
    fluxtune.apply({}, plain)  # the profile's call defaults (DiT's guidance) for both
    reference = _draw(plain, family)
    pipe = load()
    report = str(fluxtune.apply({name: {"dtype": "bfloat16"}}, pipe))
    assert "more than one dtype" in report and f"bfloat16: {name}" in report
    assert getattr(pipe, name).dtype == torch.bfloat16
    image = _draw(pipe, family)
    assert image.shape == reference.shape and torch.isfinite(image).all()
    assert 0 < (image - reference).abs().max() < 0.1  # bfloat16's rounding, not another image
    # One dtype throughout: no casts are added.
    same = load()
    assert "more than one dtype" not in str(fluxtune.apply({name: {"dtype": "float32"}}, same))
    assert torch.equal(_draw(same, family), reference)


@pytest.mark.parametrize("model", ["tiny-flux", "tiny-flux2-klein", "tiny-qwen-image"])
def test_fp8_storage_of_a_text_encoder_keeps_the_pipeline_in_its_dtype(model: str) -> None:
    """transformers' ``model.dtype`` is its first floating weight's, and pipelines make the prompt embeddings
    (FLUX.1: the latents) in ``text_encoder.dtype``: fp8 storage of a T5, CLIP or Qwen3 embedding made them
    fp8 ("normal_kernel_cpu not implemented for Float8_e4m3fn"); T5's ``wo`` also casts its input to its
    weight's dtype. Both stay in the compute dtype; the rest is stored in fp8."""
    family = pipelines.BUILTINS[model].family
    encoders = ("text_encoder", "text_encoder_2") if model == "tiny-flux" else ("text_encoder",)
    plain = pipelines.load(model, dtype="float32")
    fluxtune.apply({}, plain)
    reference = _draw(plain, family)
    pipe = pipelines.load(model, dtype="float32")
    fluxtune.apply({name: {"layerwise_casting": {}} for name in encoders}, pipe)
    for name in encoders:
        encoder = getattr(pipe, name)
        assert encoder.dtype == torch.float32
        stored = {p.dtype for p in encoder.parameters()}
        assert torch.float8_e4m3fn in stored
    image = _draw(pipe, family)
    assert torch.isfinite(image).all() and 0 < (image - reference).abs().max() < 0.5


def test_a_first_block_cache_on_flux2_is_refused_and_never_searched() -> None:
    """diffusers' first-block cache cannot bridge FLUX.2's double and single blocks: the first cached step
    raised a TypeError minutes into a run (huggingface/diffusers#14280)."""
    from fluxtune.hardware import HardwareInfo
    from fluxtune.presets import load_profile
    from fluxtune.search.space import SearchSpace

    pipe = pipelines.load("tiny-flux2-klein", dtype="float32")
    with pytest.raises(fluxtune.FluxtuneError, match=r"cache.kind=first_block does not run on FLUX.2.*use taylorseer"):
        fluxtune.apply({"cache": {"kind": "first_block", "threshold": 0.1}, "generation": GEN}, pipe)
    gpu = HardwareInfo(gpu_index=0, gpu_name="test GPU", total_memory_bytes=int(80e9), compute_capability=(9, 0),
                       driver="570", cuda_version="12.8", torch_version="2.13.0", host_ram_bytes=int(64e9), cpu_count=8)
    for family, expected in (("flux2", ("none", "taylorseer")), ("qwenimage", ("none", "first_block", "taylorseer")),
                             ("flux", ("none", "first_block", "taylorseer", "magcache"))):
        space = SearchSpace.create(gpu, family, load_profile({"family": family}))
        assert next(d for d in space.dims if d.name == "cache").choices == expected


def test_channels_last_on_a_3d_vae_is_refused_before_anything_changes() -> None:
    """Qwen-Image's VAE convolves in 3-D: ``vae.to(memory_format=torch.channels_last)`` raised a RuntimeError
    ("required rank 4 tensor") half-way through apply."""
    pipe = pipelines.load("tiny-qwen-image", dtype="float32")
    with pytest.raises(fluxtune.FluxtuneError, match="vae.channels_last=true: AutoencoderKLQwenImage has 3-D convolutions"):
        fluxtune.apply({"vae": {"channels_last": True}, "transformer": {"quantize": "int8_weight"}, "generation": GEN}, pipe)
    assert type(pipe.transformer.transformer_blocks[0].attn.to_q.weight) is torch.nn.Parameter  # not quantized


def test_a_cast_keeps_the_modules_a_model_keeps_in_float32() -> None:
    """As from_pretrained(torch_dtype=...) does (Wan keeps its norms and time embedder in float32); a plain
    module.to() cast them too, with diffusers warning that it might."""
    pipe = pipelines.load("tiny-flux", dtype="float32")
    pipe.transformer._keep_in_fp32_modules = ["norm_out"]
    report = str(fluxtune.apply({"transformer": {"dtype": "bfloat16"}}, pipe))
    assert "float32 -> bfloat16 (2 parameters of its float32 modules kept in float32)" in report
    dtypes = {n: p.dtype for n, p in pipe.transformer.named_parameters()}
    assert all((d == torch.float32) == n.startswith("norm_out.") for n, d in dtypes.items())


def test_a_transformer_stored_in_fp8_before_apply_is_not_taken_for_an_fp8_compute_dtype() -> None:
    """A pipeline whose transformer the user gave fp8 storage (diffusers' enable_layerwise_casting) shows fp8
    weights; the boundary casts must not send it fp8 inputs when another component changes dtype."""
    plain = pipelines.load("tiny-flux", dtype="float32")
    plain.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    fluxtune.apply({}, plain)
    reference = _draw(plain, "flux")
    pipe = pipelines.load("tiny-flux", dtype="float32")
    pipe.transformer.enable_layerwise_casting(storage_dtype=torch.float8_e4m3fn, compute_dtype=torch.float32)
    fluxtune.apply({"text_encoder_2": {"dtype": "bfloat16"}}, pipe)
    image = _draw(pipe, "flux")
    assert torch.isfinite(image).all() and 0 < (image - reference).abs().max() < 0.1
