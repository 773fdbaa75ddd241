"""apply(): every knob that runs on CPU really takes effect; every refusal is one clear line and
changes nothing."""

from __future__ import annotations

import pytest
import torch

import fluxtune
from fluxtune.errors import BudgetExceededError, IncompatibleKnobsError, UnsupportedHardwareError
from fluxtune.hardware import HardwareInfo
from fluxtune.tuning.quantize import quantized_linear_count
from tests.conftest import gen

STEPS = 4


def run(pipe, **kw):
    kw.setdefault("num_inference_steps", STEPS)
    return pipe("a red circle at the top left", generator=gen(), output_type="pt", **kw).images


def block_calls(pipe) -> list[int]:
    """Count the attention calls inside the transformer blocks (a cache skips whole blocks; their
    own forward hooks still fire, so the count must look inside)."""
    calls = [0]
    for _name, child in pipe.transformer.named_children():
        if isinstance(child, torch.nn.ModuleList):
            for block in child:
                attn = getattr(block, "attn", None) or getattr(block, "attn1", None)
                attn.register_forward_hook(lambda *a: calls.__setitem__(0, calls[0] + 1))
    return calls


def test_quantization_swaps_weights_and_changes_output(tiny_flux):
    ref = run(tiny_flux)
    report = fluxtune.apply({"transformer": {"quantize": "int8_weight"}}, tiny_flux)
    q, total = quantized_linear_count(tiny_flux.transformer)
    assert q == total > 0
    assert "int8_weight" in str(report)
    out = run(tiny_flux)
    assert out.shape == ref.shape and torch.isfinite(out).all()
    assert not torch.equal(out, ref)


def test_quantize_exclude_keeps_layers(tiny_flux):
    fluxtune.apply({"transformer": {"quantize": {"method": "int8_weight", "exclude": [r"norm.*\.linear", "proj_out"]}}},
                   tiny_flux)
    q, total = quantized_linear_count(tiny_flux.transformer)
    assert 0 < q < total
    assert type(tiny_flux.transformer.proj_out.weight.data) is torch.Tensor


def test_int8_dynamic_runs_on_cpu(tiny_dit):
    fluxtune.apply({"transformer": {"quantize": "int8_dynamic"}, "generation": {"steps": 2}}, tiny_dit)
    out = tiny_dit(class_labels=[1], generator=gen(), output_type="np").images
    assert out.shape[0] == 1


def test_int8_dynamic_multiplies_few_rows_by_the_dequantized_weight(tiny_flux):
    """torch._int_mm on CUDA refuses <= 16 rows (an AdaLN linear at batch 1): those calls take the
    dequantized weight; larger ones keep the int8 kernel (the same dispatch on CPU)."""
    from torch.utils._python_dispatch import TorchDispatchMode

    class Ops(TorchDispatchMode):
        def __init__(self) -> None:
            super().__init__()
            self.ops: set[str] = set()

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
            self.ops.add(func.overloadpacket.__name__)
            return func(*args, **(kwargs or {}))

    fluxtune.apply({"transformer": {"quantize": "int8_dynamic"}}, tiny_flux)
    lin = tiny_flux.transformer.transformer_blocks[0].norm1.linear
    used = {}
    for rows in (1, 16, 17, 64):
        x = torch.randn(rows, lin.in_features, dtype=lin.bias.dtype)
        with Ops() as mode:
            y = lin(x)
        used[rows] = "_int_mm" in mode.ops
        ref = torch.nn.functional.linear(x, lin.weight.dequantize().to(x.dtype), lin.bias)
        assert (y - ref).abs().max() < 0.1 * ref.abs().max()
    assert used == {1: False, 16: False, 17: True, 64: True}
    assert run(tiny_flux).shape[0] == 1


def test_first_block_cache_skips_blocks(tiny_flux):
    calls = block_calls(tiny_flux)
    run(tiny_flux)
    full = calls[0]
    calls[0] = 0
    fluxtune.apply({"cache": {"kind": "first_block", "threshold": 0.9}}, tiny_flux)
    run(tiny_flux)
    assert 0 < calls[0] < full


def test_taylorseer_and_dit_caches_run(tiny_flux, tiny_dit):
    fluxtune.apply({"cache": {"kind": "taylorseer", "cache_interval": 2, "disable_cache_before_step": 1}}, tiny_flux)
    assert torch.isfinite(run(tiny_flux, num_inference_steps=6)).all()
    calls = block_calls(tiny_dit)
    tiny_dit(class_labels=[1], generator=gen(), num_inference_steps=4, output_type="np")
    full = calls[0]
    calls[0] = 0
    fluxtune.apply({"cache": {"kind": "first_block", "threshold": 0.9}}, tiny_dit)
    for _ in range(2):  # state is reset between calls: the second call behaves like the first
        calls[0] = 0
        tiny_dit(class_labels=[1], generator=gen(), num_inference_steps=4, output_type="np")
        assert 0 < calls[0] < full


def test_vae_tiling_really_tiles(tiny_flux):
    seen = []
    original = tiny_flux.vae.tiled_decode
    tiny_flux.vae.tiled_decode = lambda *a, **k: (seen.append(1), original(*a, **k))[1]
    fluxtune.apply({"vae": {"tiling": True, "tile_size": 32, "slicing": True}}, tiny_flux)
    assert tiny_flux.vae.use_tiling and tiny_flux.vae.use_slicing
    run(tiny_flux)
    assert seen, "tiled_decode was not used"
    fluxtune.apply({}, tiny_flux)  # reversible: a plain profile turns tiling off again
    assert not tiny_flux.vae.use_tiling


def test_layerwise_casting_stores_fp8(tiny_flux):
    fluxtune.apply({"transformer": {"layerwise_casting": {}}}, tiny_flux)
    dtypes = {m.weight.dtype for m in tiny_flux.transformer.transformer_blocks.modules() if isinstance(m, torch.nn.Linear)}
    assert torch.float8_e4m3fn in dtypes
    assert torch.isfinite(run(tiny_flux)).all()


def test_fuse_qkv_then_quantize(tiny_flux):
    ref = run(tiny_flux)
    init = torch.nn.init.kaiming_uniform_
    fluxtune.apply({"compile": {"fuse_qkv": True}}, tiny_flux)
    assert torch.nn.init.kaiming_uniform_ is init  # the fuse skips random init only while it runs
    attn = tiny_flux.transformer.transformer_blocks[0].attn
    assert getattr(attn, "fused_projections", False)
    assert torch.allclose(run(tiny_flux), ref, atol=2e-3)


def test_generation_defaults_and_explicit_args_win(tiny_flux):
    steps = []
    fluxtune.apply({"generation": {"steps": 3, "height": 32, "width": 48}}, tiny_flux)
    out = tiny_flux("x", generator=gen(), output_type="pt",
                    callback_on_step_end=lambda p, i, t, kw: (steps.append(i), kw)[1]).images
    assert len(steps) == 3 and tuple(out.shape[-2:]) == (32, 48)
    steps.clear()
    tiny_flux("x", generator=gen(), output_type="pt", num_inference_steps=2,
              callback_on_step_end=lambda p, i, t, kw: (steps.append(i), kw)[1])
    assert len(steps) == 2
    assert type(tiny_flux).__name__ == "FluxPipeline"


def test_budget_guard_refuses_bigger_calls_only_under_an_active_cap(tiny_flux):
    fluxtune.apply({"budget": {"vram": "1GB"},
                    "generation": {"steps": 2, "height": 32, "width": 32, "images_per_prompt": 1}}, tiny_flux)
    # On CPU no cap holds: the profile's size is a default, a larger call is the caller's choice.
    assert tiny_flux("x", height=64, width=64, output_type="pt").images.shape[-1] == 64
    assert len(tiny_flux(["a", "b"], output_type="pt").images) == 2
    tiny_flux._fluxtune.capped = True  # what apply records on a GPU with budget.enforce
    with pytest.raises(BudgetExceededError, match=r"64x64.*generation\.width/height.*budget\.enforce=false"):
        tiny_flux("x", height=64, width=64)
    with pytest.raises(BudgetExceededError, match="images_per_prompt=1"):
        tiny_flux(["a", "b"])
    assert tiny_flux("x", output_type="pt").images.shape[-1] == 32


def test_apply_refuses_an_object_that_is_not_a_pipeline():
    from fluxtune.errors import PipelineError

    class NotAPipe:
        transformer = None

    thing = NotAPipe()
    with pytest.raises(PipelineError, match="is not a diffusers pipeline"):
        fluxtune.apply({"transformer": {"quantize": "int8_weight"}}, thing)
    assert not hasattr(thing, "_fluxtune") and type(thing) is NotAPipe
    import torch

    module = torch.nn.Linear(4, 4)
    with pytest.raises(PipelineError, match="not a diffusers pipeline"):
        fluxtune.apply({"transformer": {"quantize": "int8_weight"}}, module)
    assert type(module.weight) is torch.nn.Parameter  # untouched: not quantized


def test_strict_fails_before_any_irreversible_knob(tiny_flux):
    weight = tiny_flux.transformer.transformer_blocks[0].attn.to_q.weight
    with pytest.raises(IncompatibleKnobsError, match=r"budget skipped.*strict=True"):
        fluxtune.apply({"budget": {"vram": "8GB"}, "transformer": {"quantize": "int8_weight"}}, tiny_flux,
                       strict=True)
    assert tiny_flux.transformer.transformer_blocks[0].attn.to_q.weight is weight  # not quantized
    assert not fluxtune.tuning.is_tuned(tiny_flux)
    # and the same profile applies without strict afterwards (nothing half-done stands in the way)
    report = fluxtune.apply({"budget": {"vram": "8GB"}, "transformer": {"quantize": "int8_weight"}}, tiny_flux)
    assert any(a.knob == "quantize" for a in report.applied)


def test_a_failed_reapply_restores_the_previous_profile(tiny_flux, monkeypatch):
    from fluxtune.tuning import budget

    fluxtune.apply({"name": "a", "generation": {"steps": 2}}, tiny_flux)

    original = budget.BudgetHandler.apply

    def boom(self, ctx):
        if ctx.profile.name == "b":
            raise RuntimeError("budget handler failed")
        original(self, ctx)

    monkeypatch.setattr(budget.BudgetHandler, "apply", boom)
    with pytest.raises(RuntimeError, match="budget handler failed"):
        fluxtune.apply({"name": "b", "cache": "first_block", "generation": {"steps": 2}}, tiny_flux)
    # the cache hooks the failed profile installed are gone, and the state still says profile a
    assert not tiny_flux.transformer.is_cache_enabled
    assert tiny_flux._fluxtune.profile.name == "a"
    monkeypatch.undo()
    assert fluxtune.apply({"name": "c", "generation": {"steps": 2}}, tiny_flux).profile == "c"


def test_applying_a_profile_measured_elsewhere_warns(tiny_flux):
    from fluxtune.errors import FluxtuneWarning

    with pytest.warns(FluxtuneWarning, match="measured on NVIDIA H200") as rec:
        report = fluxtune.apply("flux-dev-fast", tiny_flux, model="tiny-flux",
                                overrides=["compile=off", "transformer.quantize=int8_weight", "attention.backend=native",
                                           "compile.fuse_qkv=false"])
    assert any("flux-dev-replica" in str(w.message) for w in rec)
    assert any("not validated" in w for w in report.warnings)


def test_second_profile_reapplies_reversible_and_refuses_irreversible(tiny_flux):
    fluxtune.apply({"name": "a", "transformer": {"quantize": "int8_weight"}, "cache": "first_block"}, tiny_flux)
    report = fluxtune.apply({"name": "b", "transformer": {"quantize": "int8_weight"}}, tiny_flux)
    assert "reverted" in str(report)
    assert not tiny_flux.transformer.is_cache_enabled
    with pytest.raises(IncompatibleKnobsError, match="transformer.quantize cannot be changed in place"):
        fluxtune.apply({"name": "c", "transformer": {"quantize": "int8_dynamic"}}, tiny_flux)
    # the refused profile changed nothing: still profile b
    assert tiny_flux._fluxtune.profile.name == "b"


def test_gpu_only_knobs_refused_on_cpu(tiny_flux):
    for data, field in [({"transformer": {"offload": "model"}}, "transformer.offload.mode=model"),
                        ({"transformer": {"quantize": "fp8_dynamic"}}, "transformer.quantize.method=fp8_dynamic"),
                        ({"text_encoder_2": {"offload": {"mode": "group"}}}, "text_encoder_2.offload.mode=group")]:
        with pytest.raises(UnsupportedHardwareError, match=field.replace(".", r"\.")):
            fluxtune.apply(data, tiny_flux)
    assert not hasattr(tiny_flux, "_fluxtune")


def test_fp8_refused_below_sm89(tiny_flux):
    ampere = HardwareInfo(gpu_index=0, gpu_name="NVIDIA A100", total_memory_bytes=80 * 10**9,
                          compute_capability=(8, 0), driver="550", cuda_version="12.4", torch_version="2.13",
                          host_ram_bytes=10**11, cpu_count=8)
    with pytest.raises(UnsupportedHardwareError, match=r"fp8_dynamic granularity=row does not run on NVIDIA A100, SM 8\.0.*int8"):
        fluxtune.apply({"transformer": {"quantize": "fp8_dynamic"}}, tiny_flux, hardware=ampere, device="cuda")
    assert not hasattr(tiny_flux, "_fluxtune")


def test_knobs_the_pipeline_lacks(tiny_dit, tiny_flux):
    with pytest.raises(IncompatibleKnobsError, match="draws 128x128 only"):
        fluxtune.apply({"generation": {"height": 256}}, tiny_dit)
    with pytest.raises(IncompatibleKnobsError, match="magcache"):
        fluxtune.apply({"cache": "magcache"}, tiny_dit)
    with pytest.raises(IncompatibleKnobsError, match="not a diffusers backend"):
        fluxtune.apply({"attention": {"backend": "warp_drive"}}, tiny_flux)
    with pytest.raises(IncompatibleKnobsError, match="for dit pipelines"):
        fluxtune.apply({"family": "dit"}, tiny_flux)
    with pytest.raises(IncompatibleKnobsError, match="has no effect"):
        fluxtune.apply({"attention": {"backend": "flex"}}, tiny_dit)
    assert not hasattr(tiny_dit, "_fluxtune")


def test_strict_turns_skips_into_errors(tiny_flux):
    report = fluxtune.apply({"budget": {"vram": "8GB"}}, tiny_flux)
    assert report.skipped and "no CUDA device" in report.skipped[0].detail
    with pytest.raises(IncompatibleKnobsError, match="strict"):
        fluxtune.apply({"budget": {"vram": "8GB"}}, tiny_flux, strict=True)


def test_report_lists_actions_in_phase_order(tiny_flux):
    report = fluxtune.apply({"transformer": {"quantize": "int8_weight"}, "cache": "first_block",
                             "vae": {"tiling": True}}, tiny_flux)
    knobs = [a.knob for a in report.actions]
    assert knobs.index("quantize") < knobs.index("vae") < knobs.index("cache") < knobs.index("offload")
    assert report.to_dict()["actions"][0]["status"] == "applied"


def test_cuda_graphs_refused_for_regional_compile(tiny_flux):
    """Regional blocks replaying one CUDA graph overwrite each other's outputs (seen on the H200)."""
    with pytest.raises(IncompatibleKnobsError, match="inductor_mode=reduce-overhead with compile.mode=regional"):
        fluxtune.apply({"compile": {"mode": "regional", "inductor_mode": "reduce-overhead"}}, tiny_flux)
    assert getattr(tiny_flux, "_fluxtune", None) is None  # refused before anything was applied


def test_regional_compile_really_compiles(tiny_flux):
    """compile.mode=regional compiles the repeated blocks with TorchDynamo/Inductor (CPU here)."""
    import torch._dynamo.utils as dynamo_utils

    torch._dynamo.reset()
    dynamo_utils.counters.clear()
    ref = run(tiny_flux)
    report = fluxtune.apply({"compile": {"mode": "regional"}}, tiny_flux)
    assert "repeated blocks" in str(report)
    out = run(tiny_flux)
    assert dynamo_utils.counters["stats"]["unique_graphs"] >= 2  # one per block class
    assert torch.allclose(out, ref, atol=2e-3)
    torch._dynamo.reset()


def test_preload_imports_what_the_profile_needs():
    """Workers import a profile's lazy dependencies before timing apply, and only those."""
    import sys

    from fluxtune.presets import load_profile
    from fluxtune.tuning import _lazy_imports, preload

    plain = load_profile({})
    assert _lazy_imports(plain) == []
    heavy = load_profile({"transformer": {"quantize": "int8_weight", "offload": "group"},
                          "compile": {"mode": "regional"}})
    names = _lazy_imports(heavy)
    assert names == ["torchao.quantization", "torch._dynamo", "torch._inductor.config", "torch._inductor.compile_fx",
                     "diffusers.hooks"]
    assert preload(heavy) >= 0.0
    assert all(n in sys.modules for n in names)


def test_a_first_apply_that_fails_after_quantizing_marks_the_components(tiny_flux, monkeypatch):
    from fluxtune.tuning import budget

    def boom(self, ctx):
        raise RuntimeError("late failure")

    monkeypatch.setattr(budget.BudgetHandler, "apply", boom)
    with pytest.raises(RuntimeError, match="late failure"):
        fluxtune.apply({"transformer": {"quantize": "int8_weight"}}, tiny_flux)
    monkeypatch.undo()
    # the weights were quantized: a retry says to reload instead of failing inside torchao
    with pytest.raises(IncompatibleKnobsError, match="reload it"):
        fluxtune.apply({"transformer": {"quantize": "int8_weight"}}, tiny_flux)
    # fresh components (a reload, or the search worker's pristine copies) clear the mark
    from fluxtune.pipelines import load

    fresh = load("tiny-flux", dtype="float32")
    tiny_flux.register_modules(transformer=fresh.transformer, text_encoder_2=fresh.text_encoder_2,
                               text_encoder=fresh.text_encoder, vae=fresh.vae)
    assert fluxtune.apply({"transformer": {"quantize": "int8_weight"}}, tiny_flux).applied


def test_compile_without_triton_on_a_gpu_is_a_skip_named_before_anything_changes(tiny_flux, monkeypatch):
    """pip's CUDA torch on Windows has no Triton, and torch.compile fails on the first call without it
    (every shipped preset compiles): apply runs such a profile eager with the reason in its report, and
    strict=True refuses it before any knob is applied; the search does not offer compile there."""
    from fluxtune import hardware
    from fluxtune.presets import load_profile
    from fluxtune.search.space import SearchSpace

    ada = HardwareInfo(gpu_index=0, gpu_name="NVIDIA GeForce RTX 4070", total_memory_bytes=12 * 2**30,
                       compute_capability=(8, 9), driver="581", cuda_version="12.8", torch_version="2.13",
                       host_ram_bytes=32 * 10**9, cpu_count=8)
    monkeypatch.setattr(hardware, "triton_available", lambda: True)
    assert ada.can_compile
    monkeypatch.setattr(hardware, "triton_available", lambda: False)
    assert not ada.can_compile and ada.without_gpu().can_compile  # the CPU's inductor needs no Triton
    with pytest.raises(IncompatibleKnobsError, match="compile skipped: Triton is not installed"):
        fluxtune.apply({"transformer": {"quantize": "int8_weight"}, "compile": {"mode": "regional"}}, tiny_flux,
                       hardware=ada, device="cuda", strict=True)
    assert not hasattr(tiny_flux, "_fluxtune") and quantized_linear_count(tiny_flux.transformer)[0] == 0
    space = SearchSpace.create(ada, "flux", load_profile({"name": "b"}))
    assert next(d for d in space.dims if d.name == "compile").choices == ("off",)
