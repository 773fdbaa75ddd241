"""Partial residency's block streamer, exercised on CPU (the copy path without CUDA streams)."""

from __future__ import annotations

import torch

from fluxtune.tuning.streaming import BlockStreamer, choose_streamed, module_bytes, transformer_blocks
from tests.conftest import gen


def test_choose_streamed_spreads_blocks_and_respects_the_budget():
    sizes = [10] * 10
    assert choose_streamed(sizes, resident_bytes=100, resident_blocks=None) == []
    s = choose_streamed(sizes, resident_bytes=60, resident_blocks=None)
    assert len(s) == 4 and s == sorted(s)
    assert max(b - a for a, b in zip(s, s[1:], strict=False)) <= 3  # spread, not bunched at the end
    assert choose_streamed(sizes, resident_bytes=None, resident_blocks=0) == list(range(10))
    assert len(choose_streamed(sizes, resident_bytes=None, resident_blocks=7)) == 3


def test_streamer_matches_resident_output_and_releases_blocks(tiny_flux):
    def run():
        return tiny_flux("a blue square", generator=gen(), num_inference_steps=3, output_type="pt").images

    ref = run()
    t = tiny_flux.transformer
    blocks = transformer_blocks(t)
    total = sum(module_bytes(b) for _, b in blocks)
    streamer = BlockStreamer(t, torch.device("cpu"), resident_bytes=total // 2, prefetch=1)
    assert 0 < len(streamer.items) < len(blocks)
    loads = []
    original = streamer._load
    streamer._load = lambda j: (loads.append(j), original(j))[1]  # type: ignore[method-assign]
    out = run()
    assert torch.equal(out, ref)
    assert loads, "streamed blocks were never loaded"
    assert not any(item.loaded for item in streamer.items), "blocks stay loaded after the forward"
    streamer.remove()
    assert torch.equal(run(), ref)


def test_streaming_moves_quantized_inner_tensors(tiny_flux):
    """torchao weights: `.data =` would leave qdata/scale behind, so their inner tensors must follow."""
    import fluxtune
    from fluxtune.tuning.streaming import _assign

    fluxtune.apply({"transformer": {"quantize": "int8_weight"}}, tiny_flux)
    lin = tiny_flux.transformer.transformer_blocks[0].attn.to_q
    w = lin.weight
    home = w.detach().to("cpu").clone() if hasattr(w, "qdata") else None
    assert home is not None, "int8_weight should give a torchao tensor subclass"
    _assign(w, home)
    assert w.qdata is home.qdata and w.scale is home.scale

    def run():
        return tiny_flux("a green circle", generator=gen(), num_inference_steps=2, output_type="pt").images

    ref = run()
    streamer = BlockStreamer(tiny_flux.transformer, torch.device("cpu"), resident_blocks=1)
    assert torch.equal(run(), ref)
    streamer.remove()


def test_streamer_can_be_removed_and_applied_again(tiny_flux):
    """A second profile re-applies partial residency on the same module (search trials do this)."""
    def run():
        return tiny_flux("a red ring", generator=gen(), num_inference_steps=2, output_type="pt").images

    ref = run()
    for resident in (1, 3):
        streamer = BlockStreamer(tiny_flux.transformer, torch.device("cpu"), resident_blocks=resident)
        assert torch.equal(run(), ref)
        streamer.remove()
    assert torch.equal(run(), ref)
