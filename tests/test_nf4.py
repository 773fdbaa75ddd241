"""quantize.method: nf4 (bitsandbytes 4-bit NormalFloat) on the CPU: in place, through fluxtune.load,
sized as the memory model says, refused where streaming would leave its scales behind."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

pytest.importorskip("bitsandbytes")

import fluxtune  # noqa: E402
from fluxtune import pipelines  # noqa: E402
from fluxtune.knobs import Quantize  # noqa: E402
from fluxtune.memory.model import quantized_bytes  # noqa: E402
from fluxtune.tuning.nf4 import is_nf4  # noqa: E402
from tests.conftest import gen  # noqa: E402

NF4 = {"name": "nf4", "family": "flux", "generation": {"height": 64, "width": 64, "steps": 2},
       "transformer": {"quantize": {"method": "nf4", "exclude": ["^proj_out$"]}}}


def _image(pipe) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return pipe("a red circle", generator=gen(0), output_type="pt").images


def _nf4_bytes(w: torch.Tensor) -> int:
    qs = w.quant_state  # type: ignore[attr-defined]
    total = w.numel() * w.element_size() + qs.absmax.numel() * qs.absmax.element_size()
    if qs.state2 is not None:
        total += qs.state2.absmax.numel() * qs.state2.absmax.element_size() + 4
    return total


def test_nf4_quantizes_linears_in_place_and_still_draws() -> None:
    pipe = pipelines.load("tiny-flux", dtype="float32")
    reference = _image(pipe)
    linears = {n: m for n, m in pipe.transformer.named_modules() if isinstance(m, torch.nn.Linear)}
    text = str(fluxtune.apply(NF4, pipe))
    assert f"nf4: {len(linears) - 1}/{len(linears)} Linear layers, 1 kept in higher precision" in text
    after = dict(pipe.transformer.named_modules())
    for name, lin in linears.items():
        assert after[name] is lin  # the same module object: hooks and LoRA wrappers keep working
        assert is_nf4(lin.weight) == (name != "proj_out"), name
    image = _image(pipe)
    assert torch.isfinite(image).all()
    # 4-bit weights move the picture, but not far: a broken dequantization draws noise.
    diff = (image - reference).abs()
    assert 0 < diff.mean() < 0.1, float(diff.mean())
    # What the memory model charges per weight is what bitsandbytes stores (codes + absmax + their scales).
    lin = next(m for n, m in linears.items() if n != "proj_out" and m.weight.quant_state.shape.numel() >= 4096)
    numel = lin.weight.quant_state.shape.numel()
    assert abs(quantized_bytes(numel, lin.out_features, Quantize(method="nf4")) - _nf4_bytes(lin.weight)) <= 16


def test_nf4_through_load_matches_apply(tmp_path: Path) -> None:
    pipelines.load("tiny-flux", dtype="float32").save_pretrained(tmp_path / "m")
    plain = pipelines.load(str(tmp_path / "m"), dtype="float32")
    fluxtune.apply(NF4, plain)
    loaded = fluxtune.load(str(tmp_path / "m"), NF4, dtype="float32")
    assert "nf4 on cpu unit by unit" in str(fluxtune.last_report(loaded))
    assert (_image(plain) - _image(loaded)).abs().max() <= 1e-5


def test_nf4_is_refused_where_streaming_would_leave_its_scales() -> None:
    from fluxtune.hardware import detect_hardware
    from fluxtune.presets import load_profile
    from fluxtune.tuning.base import Context
    from fluxtune.tuning.quantize import QuantizeHandler
    from fluxtune.tuning.report import ApplyReport

    pipe = pipelines.load("tiny-flux", dtype="float32")
    prof = load_profile({**NF4, "transformer": {"quantize": "nf4", "offload": {"mode": "partial", "resident_blocks": 1}}})
    ctx = Context(pipe=pipe, profile=prof, hardware=detect_hardware(), device=torch.device("cpu"), family="flux",
                  report=ApplyReport(profile="nf4", device="cpu"), strict=False)
    problems = QuantizeHandler().check(ctx)
    assert any("transformer.quantize.method=nf4 with transformer.offload.mode=partial" in p for p in problems)


@pytest.mark.parametrize("model,family", [("tiny-flux2-klein", "flux2"), ("tiny-qwen-image", "qwenimage")])
def test_nf4_on_the_llm_families(model: str, family: str) -> None:
    """The 4-bit recipe of the FLUX.2 / Qwen-Image guides (transformer and LLM text encoder in NF4)."""
    pipe = pipelines.load(model, dtype="float32")
    prof = {"name": "n", "family": family, "generation": {"height": 64, "width": 64, "steps": 2},
            "transformer": {"quantize": "nf4"}, "text_encoder": {"quantize": "nf4"}}
    text = str(fluxtune.apply(prof, pipe))
    assert "+ quantize     text_encoder    nf4:" in text
    head = pipe.text_encoder.get_output_embeddings()
    assert all(is_nf4(m.weight) for m in pipe.text_encoder.modules() if isinstance(m, torch.nn.Linear) and m is not head)
    # The language-model head (its logits are never read) keeps its dtype: tied, it stays one tensor.
    assert not is_nf4(head.weight)
    if getattr(pipe.text_encoder.config, "tie_word_embeddings", False):
        assert head.weight is pipe.text_encoder.get_input_embeddings().weight
    image = pipe(prompt="a red circle", generator=gen(0), output_type="pt").images
    assert image.shape[-2:] == (64, 64) and torch.isfinite(image).all()


def test_nf4_under_regional_compile_compiles_each_block_class_once() -> None:
    """A per-layer forward made TorchDynamo recompile the block for every block (on the Qwen-Image replica
    it hit the recompile limit and ran the rest eager); the NF4 layers now share their class's forward."""
    from fluxtune.measure.dynamo import DynamoWatch

    torch.compiler.reset()  # another test's compiled Qwen-Image block would count here as a recompile
    pipe = pipelines.load("tiny-qwen-image", dtype="float32")
    prof = {"name": "n", "family": "qwenimage", "generation": {"height": 64, "width": 64, "steps": 2},
            "transformer": {"quantize": "nf4"}, "compile": {"mode": "regional"}}
    fluxtune.apply(prof, pipe)
    blocks = pipe.transformer.transformer_blocks
    assert len(blocks) >= 2
    with DynamoWatch() as first:
        pipe(prompt="a red circle", generator=gen(0), output_type="pt")
    with DynamoWatch() as again:
        image = pipe(prompt="a red circle", generator=gen(0), output_type="pt").images
    assert (first.frames, first.recompiles) == (1, 0)
    assert (again.frames, again.recompiles) == (0, 0)
    assert torch.isfinite(image).all()
