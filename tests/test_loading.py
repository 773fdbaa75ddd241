"""fluxtune.load: a pipeline read from a save_pretrained directory straight into the profile's form.

The user's path (issue 15) on the CPU: the same images as from_pretrained + apply, no full host copy
of the weights, the host budget refused before a byte is read, and the streamer fed block by block.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import torch

import fluxtune
from fluxtune import pipelines
from fluxtune.errors import BudgetExceededError, PipelineError
from fluxtune.loading import skeleton
from fluxtune.loading.checkpoint import Checkpoint
from tests.conftest import gen

QUANT = {"name": "t", "family": "flux", "generation": {"height": 64, "width": 64, "steps": 2},
         "transformer": {"quantize": {"method": "int8_weight"}}, "text_encoder_2": {"quantize": {"method": "int8_weight"}}}


@pytest.fixture(scope="module")
def saved(tmp_path_factory: pytest.TempPathFactory) -> Path:
    d = tmp_path_factory.mktemp("tiny-flux-saved")
    pipelines.load("tiny-flux", dtype="float32").save_pretrained(d)
    return d


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Equal data, looking inside torchao's quantized tensors (they implement no aten.equal)."""
    if hasattr(a, "__tensor_flatten__") and type(a) is not torch.Tensor:
        names = a.__tensor_flatten__()[0]
        return type(a) is type(b) and all(_same(getattr(a, n), getattr(b, n)) for n in names)
    return torch.equal(a, b)


def _image(pipe) -> torch.Tensor:  # type: ignore[no-untyped-def]
    return pipe("a red circle", generator=gen(0), output_type="pt").images


@pytest.mark.parametrize("profile", [
    QUANT,
    # fused projections: the checkpoint has to_q/to_k/to_v, the fused model reads to_qkv as their concatenation
    {**QUANT, "compile": {"mode": "off", "fuse_qkv": True}},
    {"name": "bf16", "family": "flux", "generation": {"height": 64, "width": 64, "steps": 2}},
], ids=["int8", "fused-qkv", "plain"])
def test_load_gives_the_images_of_from_pretrained_then_apply(saved: Path, profile: dict) -> None:
    plain = pipelines.load(str(saved), dtype="float32")
    fluxtune.apply(profile, plain)
    loaded = fluxtune.load(str(saved), profile, dtype="float32")
    # The weights are equal bit for bit; float32 CPU matmuls over a memory map and over an allocation
    # of them may still round differently (1e-6 seen here), far below one 8-bit level (4e-3).
    for name, module in pipelines.module_components(plain).items():
        theirs = pipelines.module_components(loaded)[name].state_dict()
        assert all(_same(v, theirs[k]) for k, v in module.state_dict().items()), name
    assert (_image(plain) - _image(loaded)).abs().max() <= 1e-5
    report = fluxtune.last_report(loaded)
    assert report is not None and report.actions[0].knob == "load"
    # Nothing is left on the meta device, and nothing is left to read.
    for name, module in pipelines.module_components(loaded).items():
        assert not any(t.is_meta for t in [*module.parameters(), *module.buffers()]), name
    if profile.get("transformer"):
        text = str(report)
        assert "int8_weight: done on cpu block by block while placing" in text
        assert "read " in text and "int8_weight on cpu unit by unit" in text


def test_skeleton_is_on_meta_and_reads_nothing(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise AssertionError("a weight was read")

    monkeypatch.setattr(Checkpoint, "read_into", refuse)
    pipe = skeleton(str(saved), dtype="float32")
    assert all(p.is_meta for p in pipe.transformer.parameters())
    # Non-persistent buffers are computed at construction, not read: they are real.
    assert all(not b.is_meta for b in pipe.text_encoder.buffers())


def test_host_budget_is_refused_before_anything_is_read(saved: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    def refuse(*_: object) -> None:
        raise AssertionError("a weight was read before the host check")

    monkeypatch.setattr(Checkpoint, "read_into", refuse)
    with pytest.raises(BudgetExceededError) as err:
        fluxtune.load(str(saved), {**QUANT, "budget": {"host_ram": "1GB"}}, dtype="float32")
    line = str(err.value)
    assert "\n" not in line and "budget.host_ram=1" in line and "host memory" in line


def test_bad_directories_get_one_line(tmp_path: Path) -> None:
    with pytest.raises(PipelineError, match="model_index.json"):
        fluxtune.load(str(tmp_path), QUANT)
    (tmp_path / "model_index.json").write_text(json.dumps({"_class_name": "FluxPipeline",
                                                           "transformer": ["diffusers", "FluxTransformer2DModel"]}))
    (tmp_path / "transformer").mkdir()
    (tmp_path / "transformer" / "config.json").write_text("{}")
    with pytest.raises(PipelineError, match="no .safetensors weights"):
        skeleton(str(tmp_path))


def test_streamer_fed_by_the_checkpoint_matches_the_plain_model(saved: Path) -> None:
    from fluxtune.knobs import Quantize
    from fluxtune.tuning.materialize import Materializer
    from fluxtune.tuning.state import weight_plan
    from fluxtune.tuning.streaming import BlockStreamer, module_bytes, repeated_blocks

    ref = pipelines.load(str(saved), dtype="float32").transformer
    fluxtune_q = Quantize(method="int8_weight")
    from fluxtune.tuning.quantize import quantize_module

    quantize_module(ref, fluxtune_q, on_cuda=False)
    t = skeleton(str(saved), dtype="float32").transformer
    plan = weight_plan(t)
    assert plan is not None
    plan.quantize = fluxtune_q
    mat = Materializer(t, plan, torch.device("cpu"), on_cuda=False)
    expected = [mat.expected_bytes(name) for name, _ in repeated_blocks(t)]
    streamer = BlockStreamer(t, torch.device("cpu"), resident_blocks=1, materializer=mat)
    mat.close()
    actual = [module_bytes(b) for _, b in repeated_blocks(t)]
    # Residency is chosen from the quantized sizes, before any weight is read.
    for e, a in zip(expected, actual, strict=True):
        assert abs(e - a) <= 0.05 * a
    assert len(streamer.items) == len(actual) - 1
    cfg = ref.config
    kw = dict(hidden_states=torch.randn(1, 16, cfg.in_channels), encoder_hidden_states=torch.randn(1, 8, cfg.joint_attention_dim),
              pooled_projections=torch.randn(1, cfg.pooled_projection_dim), timestep=torch.tensor([0.5]),
              img_ids=torch.zeros(16, 3), txt_ids=torch.zeros(8, 3),
              guidance=torch.tensor([3.5]) if cfg.guidance_embeds else None)
    with torch.no_grad():
        assert torch.equal(ref(**kw).sample, t(**kw).sample)
        streamer.remove()  # weights go back whole to the host, not to the meta device
        assert all(p.device.type == "cpu" for p in t.parameters())
        assert torch.equal(ref(**kw).sample, t(**kw).sample)


# A FLUX pipeline whose transformer is large enough (about 0.9 GB in float32) for RSS to tell a full copy
# from a block at a time.
_PEAK = textwrap.dedent("""
    import json, sys, psutil, torch
    torch.set_num_threads(1)
    import fluxtune
    from fluxtune import pipelines
    # The libraries both paths import, imported before the baseline is taken.
    import torchao.quantization
    from diffusers import AutoencoderKL, FluxPipeline, FluxTransformer2DModel
    from transformers import CLIPTextModel, T5EncoderModel
    directory, how = sys.argv[1], sys.argv[2]
    profile = {"name": "q", "family": "flux", "transformer": {"quantize": {"method": "int8_weight"}},
               "generation": {"height": 64, "width": 64, "steps": 1}}
    before = psutil.Process().memory_info().rss
    if how == "plain":
        pipe = pipelines.load(directory, dtype="float32")
        fluxtune.apply(profile, pipe)
    else:
        pipe = fluxtune.load(directory, profile, dtype="float32")
    # VmHWM: this process image's peak (ru_maxrss would carry the parent's peak across fork and exec).
    hwm = next(line for line in open("/proc/self/status") if line.startswith("VmHWM:"))
    print(json.dumps({"growth": int(hwm.split()[1]) * 1024 - before}))
""")


@pytest.fixture(scope="module")
def saved_wide(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, int]:
    from diffusers import FluxTransformer2DModel

    d = tmp_path_factory.mktemp("wide-flux-saved")
    pipe = pipelines.load("tiny-flux", dtype="float32")
    torch.manual_seed(0)
    # Many blocks, each small next to the whole (about 4 %), as in FLUX.1 (57 blocks).
    wide = FluxTransformer2DModel(patch_size=1, in_channels=pipe.transformer.config.in_channels, num_layers=1,
                                  num_single_layers=24, attention_head_dim=64, num_attention_heads=12,
                                  joint_attention_dim=pipe.transformer.config.joint_attention_dim,
                                  pooled_projection_dim=pipe.transformer.config.pooled_projection_dim,
                                  guidance_embeds=pipe.transformer.config.guidance_embeds,
                                  axes_dims_rope=pipe.transformer.config.axes_dims_rope)
    pipe.register_modules(transformer=wide)
    pipe.save_pretrained(d)
    nbytes = sum(p.numel() * p.element_size() for p in wide.parameters())
    return d, nbytes


def _growth(directory: Path, how: str) -> int:
    # glibc keeps freed blocks under 32 MB in its heap; allocating them as mappings makes RSS follow
    # what is alive, in both paths alike.
    env = {**os.environ, "MALLOC_MMAP_THRESHOLD_": "65536"}
    out = subprocess.run([sys.executable, "-c", _PEAK, str(directory), how], capture_output=True, text=True,
                         timeout=300, check=True, env=env)
    return int(json.loads(out.stdout.strip().splitlines()[-1])["growth"])


def test_load_keeps_no_full_host_copy(saved_wide: tuple[Path, int]) -> None:
    directory, fp32_bytes = saved_wide
    assert fp32_bytes > 500e6
    plain, loaded = _growth(directory, "plain"), _growth(directory, "load")
    # from_pretrained holds every float32 weight before quantizing; load holds the int8 weights
    # (a quarter) plus a block or two at a time.
    assert plain > 0.9 * fp32_bytes
    assert loaded < 0.6 * fp32_bytes, (plain, loaded, fp32_bytes)


def test_default_host_budget() -> None:
    from fluxtune.memory import default_host_budget

    assert default_host_budget(32 * 2**30) == 28 * 2**30
    assert default_host_budget(128 * 2**30) == 112 * 2**30
    assert default_host_budget(16 * 2**30) == 12 * 2**30


def test_sampler_counts_children() -> None:
    from fluxtune.measure.sampler import Sampler

    child = subprocess.Popen([sys.executable, "-c", "a = bytearray(300_000_000); import time; time.sleep(30)"])
    try:
        import psutil

        proc = psutil.Process(child.pid)
        deadline = time.time() + 20
        while proc.memory_info().rss < 250e6 and time.time() < deadline:
            time.sleep(0.1)
        own = psutil.Process().memory_info().rss
        assert Sampler(None).host_rss() >= own + 250e6
    finally:
        child.kill()
        child.wait()


def test_loras_go_through_load(saved: Path, tmp_path: Path) -> None:
    """LoRAs need the plain weights (peft attaches to them, fuse mode edits them): load reads those
    components onto the host first, then applies as from_pretrained + apply would."""
    from tests.test_lora import make_lora

    lora = make_lora(pipelines.load(str(saved), dtype="float32"), tmp_path / "l", 1)
    profile = {**QUANT, "loras": [{"path": lora, "mode": "fuse"}]}
    plain = pipelines.load(str(saved), dtype="float32")
    fluxtune.apply(profile, plain)
    loaded = fluxtune.load(str(saved), profile, dtype="float32")
    assert "fuse" in str(fluxtune.last_report(loaded))
    assert (_image(plain) - _image(loaded)).abs().max() <= 1e-5


def test_an_uncached_hub_id_offline_is_one_line(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    with pytest.raises(PipelineError) as err:
        fluxtune.load("nobody-here/no-such-model", QUANT)
    assert "\n" not in str(err.value) and "no-such-model" in str(err.value)


def test_generate_reads_a_saved_directory(saved: Path, tmp_path: Path) -> None:
    import yaml

    from fluxtune.cli import main

    profile = tmp_path / "p.yaml"
    profile.write_text(yaml.safe_dump(QUANT))
    out = tmp_path / "x.png"
    assert main(["generate", str(profile), "--model", str(saved), "--out", str(out), "--dtype", "float32"]) == 0
    assert out.stat().st_size > 0
