"""Partial residency's block streamer, exercised on CPU (the copy path without CUDA streams)."""

from __future__ import annotations

import pytest
import torch

from fluxtune.tuning.streaming import BlockStreamer, choose_streamed, module_bytes, repeated_blocks
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
    blocks = repeated_blocks(t)
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


def test_a_discarded_pipeline_frees_its_streamed_blocks_without_copying_them_back(tiny_flux):
    """``discard`` (a worker replacing its pipeline) closes the arenas and removes the hooks at once;
    ``remove`` would first copy every streamed block back to where it came from."""
    from fluxtune.tuning.state import discard, set_streamer

    streamer = BlockStreamer(tiny_flux.transformer, torch.device("cpu"), resident_blocks=1)
    set_streamer(tiny_flux.transformer, streamer)
    assert streamer.arenas and streamer.items
    put_back = []
    streamer._release = lambda j: put_back.append(j)  # type: ignore[method-assign]
    assert "transformer" in discard(tiny_flux)
    assert not streamer.arenas and not streamer.items and not streamer._handles and not put_back
    assert not list(tiny_flux.transformer.parameters()) and not list(tiny_flux.vae.buffers())


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


def test_repeated_blocks_find_the_text_encoders_nested_lists(tiny_flux):
    t5 = [n for n, _ in repeated_blocks(tiny_flux.text_encoder_2)]
    clip = [n for n, _ in repeated_blocks(tiny_flux.text_encoder)]
    assert t5 and all(n.startswith("encoder.block.") for n in t5)  # not the per-block `layer` lists
    assert clip and all(n.split(".")[-3:-1] == ["encoder", "layers"] for n in clip)
    top = {n.split(".")[0] for n, _ in repeated_blocks(tiny_flux.transformer)}
    assert top == {"transformer_blocks", "single_transformer_blocks"}


def test_text_encoders_stream_every_block_with_the_same_images(tiny_flux):
    """Profiles stream T5 and CLIP with resident_blocks=0 (apply refuses offload on CPU, so the
    streamer is driven directly here)."""
    def run():
        return tiny_flux("a yellow star", generator=gen(), num_inference_steps=2, output_type="pt").images

    ref = run()
    streamers = [BlockStreamer(m, torch.device("cpu"), resident_blocks=0)
                 for m in (tiny_flux.text_encoder, tiny_flux.text_encoder_2)]
    assert [len(s.items) for s in streamers] == [len(repeated_blocks(m)) for m in
                                                 (tiny_flux.text_encoder, tiny_flux.text_encoder_2)]
    assert all(len(s.arenas) == len(s.items) for s in streamers)  # one arena per streamed block
    assert torch.equal(run(), ref)
    for s in streamers:
        s.remove()
        assert not s.arenas
    assert torch.equal(run(), ref)


def test_host_arena_packs_tensors_with_their_layout():
    from fluxtune.tuning.hostmem import ALIGN, HostArena, aligned

    a = torch.arange(12, dtype=torch.float32).reshape(3, 4)
    b = torch.arange(20, dtype=torch.int8).reshape(4, 5).t()  # transposed: strides kept
    c = torch.tensor(2.5, dtype=torch.bfloat16)  # 0-dim scale
    arena = HostArena(aligned(a.nbytes) + aligned(b.nbytes) + aligned(c.nbytes), pin=False)
    ta, tb, tc = arena.take(a), arena.take(b), arena.take(c)
    assert torch.equal(ta, a) and torch.equal(tb, b) and torch.equal(tc, c)
    assert tb.stride() == b.stride() and tc.shape == c.shape and tc.dtype is torch.bfloat16
    assert all(t.data_ptr() % ALIGN == 0 for t in (ta, tb, tc))
    assert ta.data_ptr() != a.data_ptr()  # a copy, not a view
    try:
        arena.take(a)
    except ValueError as e:
        assert "do not fit" in str(e)
    else:
        raise AssertionError("an overfull arena should refuse")
    arena.close()
    arena.close()  # idempotent
    assert torch.equal(ta, a)  # still readable host memory


def test_dit_streams_block_zero_but_keeps_its_embedding_resident(tiny_dit):
    """DiT calls transformer_blocks[0].norm1.emb after the loop: streaming every block must still work."""
    def run():
        return tiny_dit(class_labels=[1], generator=gen(), num_inference_steps=2, output_type="np").images

    ref = run()
    t = tiny_dit.transformer
    streamer = BlockStreamer(t, torch.device("cpu"), resident_blocks=0)
    assert len(streamer.items) == len(repeated_blocks(t))
    emb = {id(p) for p in t.transformer_blocks[0].norm1.emb.parameters()}
    homes = {id(m._parameters[n]) for item in streamer.items for m, n, _ in item.homes}
    assert emb and not emb & homes
    import numpy as np

    assert np.array_equal(run(), ref)
    streamer.remove()


def test_block_level_group_offload_is_refused_for_dit(tiny_dit):
    from fluxtune.hardware import detect_hardware
    from fluxtune.profile import validate_profile
    from fluxtune.tuning.base import Context
    from fluxtune.tuning.placement import PlacementHandler
    from fluxtune.tuning.report import ApplyReport

    prof = validate_profile({"family": "dit", "transformer": {"offload": {"mode": "group", "level": "block"}}})
    ctx = Context(pipe=tiny_dit, profile=prof, hardware=detect_hardware(), device=torch.device("cpu"), family="dit",
                  report=ApplyReport(profile="x", device="cpu"))
    problems = PlacementHandler().check(ctx)
    assert any("transformer.offload.level=block" in p and "level=leaf" in p for p in problems)


def test_fault_in_touches_every_page_of_a_fresh_mapping():
    import mmap

    from fluxtune.tuning.hostmem import _page_stride, fault_in

    m = mmap.mmap(-1, 8 << 20, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    buf = torch.frombuffer(m, dtype=torch.uint8)
    buf.fill_(7)
    fault_in(buf.data_ptr(), buf.numel())
    stride = _page_stride()
    assert stride in (mmap.PAGESIZE, 2 << 20)
    assert int(buf[::stride].sum()) == 0 and int(buf[1]) == 7  # one byte written per page, nothing else


def test_model_offload_onloads_are_paced_when_the_component_moves(monkeypatch: pytest.MonkeyPatch) -> None:
    """Under card emulation accelerate's model-offload onload waits as long as the card's link would take;
    a call that finds the component already on the device waits for nothing."""
    from fluxtune.tuning import placement

    paced: list[int] = []

    class Pacer:  # the GPU sleep kernel, recorded instead
        def __init__(self, gbs: float, device: object) -> None:
            self.gbs = gbs

        def pace(self, nbytes: int) -> None:
            paced.append(nbytes)

        def describe(self) -> str:
            return f"copies paced to {self.gbs:g} GB/s"

    class OffloadHook:  # accelerate's CpuOffload: moves the module to its execution device
        def pre_forward(self, module: torch.nn.Module, *args: object, **kwargs: object) -> tuple:
            module.to("meta")
            return args, kwargs

    monkeypatch.setattr("fluxtune.tuning.streaming.CopyPacer", Pacer)
    module = torch.nn.Linear(4, 8)
    assert "NOT paced" in placement._pace_model_offload(module, 12.6, torch.device("cpu"))
    module._hf_hook = OffloadHook()  # type: ignore[assignment]
    assert placement._pace_model_offload(module, 12.6, torch.device("cpu")) == "copies paced to 12.6 GB/s"
    module._hf_hook.pre_forward(module, torch.ones(4))
    module._hf_hook.pre_forward(module, torch.ones(4))
    assert paced == [(4 * 8 + 8) * 4]


@pytest.mark.parametrize("kind", ["first_block", "magcache"])
def test_blocks_a_cache_skips_are_not_copied(kind: str) -> None:
    """diffusers' block-level caches return without running a skipped block's own forward, but torch's
    forward hooks still fire: the streamer copied every streamed block each step, cached or not (16 copies
    in 4 steps here where 10 are needed). It now loads such a block inside the cache's hook."""
    from diffusers.hooks import (
        FirstBlockCacheConfig,
        MagCacheConfig,
        apply_first_block_cache,
        apply_mag_cache,
    )

    from fluxtune.pipelines import load

    def draw(threshold: float, stream: bool) -> tuple[torch.Tensor, list[int], object]:
        pipe = load("tiny-flux", dtype="float32")
        t = pipe.transformer
        if kind == "first_block":
            apply_first_block_cache(t, FirstBlockCacheConfig(threshold=threshold))
        else:  # magcache needs a ratio per step; skips when the accumulated error stays below threshold
            apply_mag_cache(t, MagCacheConfig(threshold=threshold, max_skip_steps=4, retention_ratio=0.0,
                                              num_inference_steps=4, mag_ratios=[0.5] * 4))
        loads: list[int] = []
        streamer = None
        if stream:
            streamer = BlockStreamer(t, torch.device("cpu"), resident_blocks=0)
            original = streamer._load
            streamer._load = lambda j: (None if streamer.items[j].loaded else loads.append(j), original(j))[1]  # type: ignore[method-assign, union-attr]
        image = pipe(prompt="a fox", height=64, width=64, num_inference_steps=4, generator=gen(),
                     output_type="pt").images
        return image, loads, (pipe, streamer)

    for threshold, most in ((1e9, 10), (1e-9, 16)):  # every step after the first skips / none does
        plain, _, _ = draw(threshold, stream=False)
        streamed, loads, (pipe, streamer) = draw(threshold, stream=True)
        assert torch.equal(plain, streamed)
        assert len(loads) <= most
    assert len(loads) == 16  # a step that computes still loads every block
    block = streamer.items[1].block  # type: ignore[union-attr]
    ref = block._diffusers_hook._fn_refs[0]
    streamer.remove()  # type: ignore[union-attr]
    assert ref.original_forward.__func__ is type(block).forward  # the block's own forward again
