"""modulation.cache on the tiny Qwen-Image: the same images, one fill per step schedule, the weights out of
the transformer (and out of the memory model's blocks), compiled without recompiling, refused elsewhere."""

from __future__ import annotations

import pytest
import torch

import fluxtune
from fluxtune import pipelines
from fluxtune.errors import IncompatibleKnobsError
from fluxtune.memory.facts import ModelFacts
from fluxtune.memory.model import predict, transfer_bytes
from fluxtune.presets import load_profile
from tests.conftest import gen

BASE = {"name": "q", "family": "qwenimage", "generation": {"height": 64, "width": 64, "steps": 3}}
CACHED = {**BASE, "modulation": {"cache": True}}


def _draw(pipe, seed: int = 0, **kw):  # type: ignore[no-untyped-def]
    return pipe(prompt="a red circle", generator=gen(seed), output_type="pt", **kw).images


def test_modulation_cache_draws_the_same_images_from_one_fill_per_schedule() -> None:
    plain = pipelines.load("tiny-qwen-image", dtype="float32")
    fluxtune.apply(BASE, plain)
    pipe = pipelines.load("tiny-qwen-image", dtype="float32")
    before = sum(p.numel() for p in pipe.transformer.parameters())
    text = str(fluxtune.apply(CACHED, pipe))
    assert "modulation   transformer     4 modulation layers" in text
    cache = pipe.transformer._fluxtune_modulation_cache
    removed = before - sum(p.numel() for p in pipe.transformer.parameters())
    assert removed == sum(layer.weight.numel() + layer.bias.numel() for layer in cache.layers) > 0
    assert not any("img_mod" in n or "txt_mod" in n for n, _ in pipe.transformer.named_parameters())
    for seed in (0, 1):
        assert (_draw(plain, seed) - _draw(pipe, seed)).abs().max() < 1e-5
    # The first call computed the whole schedule at its first step; the second call only read it.
    assert (cache.misses, cache.filled) == (1, 3)
    # Another step count is another schedule: one more fill, of its 5 steps.
    assert (_draw(plain, num_inference_steps=5) - _draw(pipe, num_inference_steps=5)).abs().max() < 1e-5
    assert (cache.misses, cache.filled) == (2, 8)
    assert cache.fallbacks == 0


def test_a_block_fed_another_embedding_computes_it_and_says_so_once() -> None:
    """A caller that hands a block some other embedding gets that embedding's modulation (from the host copy),
    with one warning for the run, not a stale cached row."""
    from fluxtune.errors import FluxtuneWarning

    pipe = pipelines.load("tiny-qwen-image", dtype="float32")
    original = pipe.transformer.transformer_blocks[0].img_mod
    fluxtune.apply(CACHED, pipe)
    _draw(pipe)
    cached = pipe.transformer.transformer_blocks[0].img_mod
    temb = torch.randn(1, original[1].in_features)
    with pytest.warns(FluxtuneWarning, match="modulation.cache: a block was fed"):
        out = cached(temb)
    assert (out - original(temb)).abs().max() < 1e-5
    cached(temb)
    cache = pipe.transformer._fluxtune_modulation_cache
    assert cache.fallbacks == 2


def test_modulation_cache_in_bfloat16_fills_each_schedule_once() -> None:
    """The pipeline passes ``t.to(bfloat16) / 1000``: the schedule's embeddings must be made the same way,
    or every step would miss and fill again."""
    pipe = pipelines.load("tiny-qwen-image", dtype="bfloat16")
    fluxtune.apply(CACHED, pipe)
    cache = pipe.transformer._fluxtune_modulation_cache
    _draw(pipe)
    _draw(pipe, 1)
    assert (cache.misses, cache.filled) == (1, 3)


def test_modulation_cache_with_true_cfg_and_quantized_weights() -> None:
    """Both CFG passes of a step read one entry; with the transformer quantized the host copy is float8."""
    prof = {**CACHED, "generation": {**BASE["generation"], "negative_prompt": " "},
            "transformer": {"quantize": "int8_weight"}}
    ref = {**prof, "modulation": {"cache": False}}
    plain = pipelines.load("tiny-qwen-image", dtype="float32")
    fluxtune.apply(ref, plain)
    pipe = pipelines.load("tiny-qwen-image", dtype="float32")
    fluxtune.apply(prof, pipe)
    cache = pipe.transformer._fluxtune_modulation_cache
    assert all(layer.weight.dtype == torch.float8_e4m3fn for layer in cache.layers)
    a, b = _draw(plain), _draw(pipe)
    assert cache.misses == 1
    # float8 modulation weights (int8 before, on the GPU) move the picture a little, not far.
    assert 0 < (a - b).abs().mean() < 0.02


def test_modulation_cache_under_regional_compile_compiles_once() -> None:
    from fluxtune.measure.dynamo import DynamoWatch

    pipe = pipelines.load("tiny-qwen-image", dtype="float32")
    fluxtune.apply({**CACHED, "compile": {"mode": "regional"}}, pipe)
    _draw(pipe)
    with DynamoWatch() as again:
        _draw(pipe, 1)
    assert (again.frames, again.recompiles) == (0, 0)


@pytest.mark.parametrize("model,family", [("tiny-flux", "flux"), ("tiny-flux2-klein", "flux2")])
def test_modulation_cache_is_refused_where_the_blocks_have_none(model: str, family: str) -> None:
    pipe = pipelines.load(model, dtype="float32")
    with pytest.raises(IncompatibleKnobsError, match=r"modulation.cache=true: .* drop it for this pipeline"):
        fluxtune.apply({"name": "x", "family": family, "modulation": {"cache": True}}, pipe)


def test_memory_model_takes_the_modulation_off_the_gpu() -> None:
    """Qwen-Image replica, the 16 GB candidate: a third of the transformer leaves the blocks, so fewer bytes
    stream each step; the weights go to host memory as float8."""
    facts = ModelFacts.for_builtin("qwen-image-replica")
    base = load_profile({"name": "q", "family": "qwenimage", "budget": {"vram": "16GB"},
                         "transformer": {"quantize": {"method": "fp8_dynamic", "granularity": "tensor"},
                                         "offload": {"mode": "partial", "resident": "10.5GB"}}})
    cached = base.model_copy(update={"modulation": base.modulation.model_copy(update={"cache": True})})
    t, removed = facts.components["transformer"].without_modulation()
    assert 6.7e9 < removed < 6.9e9 and t.params == facts.components["transformer"].params - removed
    assert sum(t.blocks["transformer_blocks"]) == sum(facts.components["transformer"].blocks["transformer_blocks"]) - removed
    before, after = transfer_bytes(base, facts)["transformer"][0], transfer_bytes(cached, facts)["transformer"][0]
    assert before > 9e9 and after < 3.5e9
    # Host memory: the float8 modulation (1 byte a weight) in place of as many streamed float8 bytes.
    host_base, host_cached = predict(base, facts).host_ram, predict(cached, facts).host_ram
    assert host_cached > removed and abs(host_cached - host_base) < 1e9


def test_modulation_cache_is_irreversible_like_quantization() -> None:
    pipe = pipelines.load("tiny-qwen-image", dtype="float32")
    fluxtune.apply(CACHED, pipe)
    with pytest.raises(IncompatibleKnobsError, match="modulation"):
        fluxtune.apply(BASE, pipe)
    fluxtune.apply({**CACHED, "generation": {"height": 64, "width": 64, "steps": 2}}, pipe)  # agreeing: fine
    assert _draw(pipe).shape[-2:] == (64, 64)


def test_predict_counts_the_modulation_cache() -> None:
    """Fewer streamed bytes and no modulation GEMMs: on the H200 with an RTX 4080's link (link-bound) the
    16 GB candidate drops by more than half; on the 4080 itself (compute-bound) by a few percent."""
    from fluxtune.gpus import find_gpu
    from fluxtune.predict import emulated_on, predict_latency, resolve_for_card

    card = find_gpu("RTX 4080")
    base = resolve_for_card(load_profile({
        "name": "q", "family": "qwenimage", "budget": {"vram": "16GB"},
        "generation": {"height": 1024, "width": 1024, "steps": 50},
        "transformer": {"quantize": {"method": "fp8_dynamic", "granularity": "tensor"},
                        "offload": {"mode": "partial", "resident": "10.5GB"}}}), card)
    cached = base.model_copy(update={"modulation": base.modulation.model_copy(update={"cache": True})})
    lab = emulated_on(card, find_gpu("H200"))
    before, after = (predict_latency(p, lab, model="qwen-image-replica") for p in (base, cached))
    assert after.total_s < 0.5 * before.total_s
    assert after.phases["transformer"].memory_s < before.phases["transformer"].memory_s
    on_card = [predict_latency(p, card, model="qwen-image-replica").total_s for p in (base, cached)]
    assert 0.85 * on_card[0] < on_card[1] < on_card[0]


def test_modulation_cache_on_the_user_path_from_a_saved_directory(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """``fluxtune.load`` reads a save_pretrained directory straight into the profile's form (the transformer
    starts on the meta device): the cache's host copy must hold the checkpoint's weights, not meta tensors."""
    pipelines.load("tiny-qwen-image", dtype="float32").save_pretrained(tmp_path)
    prof = {**CACHED, "transformer": {"quantize": "int8_weight"}}
    plain = pipelines.load(str(tmp_path), dtype="float32")
    fluxtune.apply(prof, plain)
    loaded = fluxtune.load(str(tmp_path), prof, dtype="float32")
    cache = loaded.transformer._fluxtune_modulation_cache
    assert not any(layer.weight.is_meta for layer in cache.layers)
    mine = plain.transformer._fluxtune_modulation_cache
    assert all(torch.equal(a.weight.float(), b.weight.float()) for a, b in zip(mine.layers, cache.layers, strict=True))
    assert (_draw(plain) - _draw(loaded)).abs().max() <= 1e-5
    assert (cache.misses, cache.fallbacks) == (1, 0)
