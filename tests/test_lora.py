"""LoRAs: built locally with peft on tiny-flux; fused, adapter and switching paths on CPU."""

from __future__ import annotations

import copy
from pathlib import Path

import pytest
import torch

import fluxtune
from fluxtune.errors import IncompatibleKnobsError, ProfileError
from fluxtune.measure import DynamoWatch
from fluxtune.tuning.quantize import quantized_linear_count
from tests.conftest import gen

STEPS = 3
TARGETS = ["to_q", "to_k", "to_v", "to_out.0"]
# Measured on CPU (tiny-flux, 3 steps, B ~ N(0, 3^2)): fused+int8 vs fp32 adapter 64 dB, int8 vs fp32
# without LoRA 66.5 dB (so fusing adds almost nothing to int8's own drift), fused fp32 vs adapter 138 dB,
# and the LoRA's own effect 26.6 dB. "Close" = above 50 dB; "changed" = below 40 dB.
PSNR_CLOSE_DB = 50.0
PSNR_CHANGED_DB = 40.0


def run(pipe):
    return pipe("a red circle at the top left", generator=gen(), num_inference_steps=STEPS, output_type="pt").images


def psnr(a: torch.Tensor, b: torch.Tensor) -> float:
    mse = torch.mean((a.float() - b.float()) ** 2).item()
    return float("inf") if mse == 0 else 10 * torch.log10(torch.tensor(1.0 / mse)).item()


def make_lora(pipe, path, seed: int, targets=TARGETS, rename=None) -> str:
    from diffusers import FluxPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    t = copy.deepcopy(pipe.transformer)
    t.add_adapter(LoraConfig(r=4, lora_alpha=4, target_modules=targets), adapter_name="x")
    g = torch.Generator().manual_seed(seed)
    for name, p in t.named_parameters():
        if "lora_B" in name:  # peft initialises B to zero: the LoRA would change nothing
            p.data = torch.randn(p.shape, generator=g) * 3.0
    sd = get_peft_model_state_dict(t, adapter_name="x")
    if rename:
        sd = {rename(k): v for k, v in sd.items()}
    FluxPipeline.save_lora_weights(str(path), transformer_lora_layers=sd, weight_name=f"{path.name}.safetensors")
    return str(path / f"{path.name}.safetensors")


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    from fluxtune.pipelines import load

    pipe = load("tiny-flux", dtype="float32")
    root = tmp_path_factory.mktemp("loras")
    out = {name: make_lora(pipe, root / name, seed) for name, seed in (("a", 1), ("b", 2))}
    out["bad_targets"] = make_lora(pipe, root / "bad_targets", 3, rename=lambda k: k.replace(".to_q.", ".to_zz."))
    from safetensors.torch import save_file

    save_file({"weight": torch.zeros(4, 4)}, str(root / "model.safetensors"))
    out["not_lora"] = str(root / "model.safetensors")
    return out


def test_lora_changes_output_and_auto_picks_adapter(tiny_flux, files):
    ref = run(tiny_flux)
    report = fluxtune.apply({}, tiny_flux, loras=[files["a"]])
    assert "adapter (auto:" in str(report)
    out = run(tiny_flux)
    assert psnr(out, ref) < PSNR_CHANGED_DB


def test_fused_int8_close_to_fp32_adapter(files):
    from fluxtune.pipelines import load

    adapter = load("tiny-flux", dtype="float32")
    fluxtune.apply({}, adapter, loras=[{"path": files["a"], "scale": 0.8, "mode": "adapter"}])
    ref = run(adapter)
    fused = load("tiny-flux", dtype="float32")
    report = fluxtune.apply({"transformer": {"quantize": "int8_weight"}}, fused, loras=[{"path": files["a"], "scale": 0.8}])
    assert "fuse (auto:" in str(report)
    q, total = quantized_linear_count(fused.transformer)
    assert q == total > 0  # fused weights were quantized, no peft layers left
    assert not any("lora" in n for n, _ in fused.transformer.named_modules())
    out = run(fused)
    assert psnr(out, ref) > PSNR_CLOSE_DB


def test_set_loras_switches_back_exactly_without_reloading_base(tiny_flux, files, monkeypatch):
    fluxtune.apply({"transformer": {"quantize": "int8_weight"}}, tiny_flux, loras=[files["a"]])
    first_a = run(tiny_flux)
    import diffusers

    def no_base_reload(*a, **k):
        raise AssertionError("base weights reloaded from disk")

    monkeypatch.setattr(diffusers.FluxTransformer2DModel, "from_pretrained", no_base_reload)
    report = fluxtune.set_loras(tiny_flux, [files["b"]])
    assert "re-quantized" in str(report)
    b = run(tiny_flux)
    assert psnr(b, first_a) < PSNR_CHANGED_DB
    fluxtune.set_loras(tiny_flux, [files["a"]])
    again_a = run(tiny_flux)
    torch.testing.assert_close(again_a, first_a, atol=1e-6, rtol=0)
    assert tiny_flux._fluxtune.profile.loras[0].path == files["a"]
    assert quantized_linear_count(tiny_flux.transformer)[0] == quantized_linear_count(tiny_flux.transformer)[1]
    fluxtune.set_loras(tiny_flux, [])
    assert psnr(run(tiny_flux), first_a) < PSNR_CHANGED_DB


def test_set_loras_adapter_mode_round_trip(tiny_flux, files):
    fluxtune.apply({}, tiny_flux, loras=[files["a"]])
    first_a = run(tiny_flux)
    fluxtune.set_loras(tiny_flux, [files["b"]])
    assert psnr(run(tiny_flux), first_a) < PSNR_CHANGED_DB
    report = fluxtune.set_loras(tiny_flux, [files["a"]])
    assert "0 adapter(s) loaded" in str(report)  # switching back reads nothing from disk
    torch.testing.assert_close(run(tiny_flux), first_a, atol=1e-6, rtol=0)


def _state(pipe):
    return {k: v.clone() for k, v in pipe.transformer.state_dict().items()}


@pytest.mark.parametrize("which", ["pickle", "not_lora", "bad_targets", "missing"])
def test_refusals_are_one_line_and_change_nothing(tiny_flux, files, tmp_path, which):
    path = {"pickle": str(tmp_path / "x.bin"), "missing": str(tmp_path / "nope.safetensors")}.get(which) or files[which]
    before = _state(tiny_flux)
    modules = [type(m) for m in tiny_flux.transformer.modules()]
    with pytest.raises((IncompatibleKnobsError, ProfileError)) as err:
        fluxtune.apply({"transformer": {"quantize": "int8_weight"}}, tiny_flux, loras=[path])
    msg = str(err.value)
    assert "\n" not in msg and path.rsplit("/", 1)[-1].split(".")[0] in msg
    expected = {"pickle": "not a .safetensors", "not_lora": "not a LoRA", "bad_targets": "to_zz",
                "missing": "no such file"}[which]
    assert expected in msg
    assert not fluxtune.tuning.is_tuned(tiny_flux)
    assert [type(m) for m in tiny_flux.transformer.modules()] == modules
    after = _state(tiny_flux)
    assert all(torch.equal(before[k], after[k]) for k in before)


def test_quantize_plus_adapter_refused(tiny_flux, files):
    with pytest.raises(ProfileError, match="mode=adapter with transformer.quantize"):
        fluxtune.apply({"transformer": {"quantize": "int8_weight"}}, tiny_flux,
                       loras=[{"path": files["a"], "mode": "adapter"}])
    assert not fluxtune.tuning.is_tuned(tiny_flux)


def test_hotswap_rank_declaration_refused(tiny_flux, files):
    with pytest.raises(IncompatibleKnobsError, match="rank 4 exceeds max_rank=2"):
        fluxtune.apply({}, tiny_flux, loras=[{"path": files["a"], "mode": "hotswap", "max_rank": 2}])


def test_hotswap_swaps_without_new_adapters(tiny_flux, files):
    report = fluxtune.apply({}, tiny_flux, loras=[{"path": files["a"], "mode": "hotswap", "max_rank": 8}])
    assert "hot-swappable up to rank 8" in str(report)
    first_a = run(tiny_flux)
    fluxtune.set_loras(tiny_flux, [{"path": files["b"], "mode": "hotswap"}])
    assert tiny_flux.get_list_adapters() == {"transformer": ["a"]}  # swapped into the same slot
    assert psnr(run(tiny_flux), first_a) < PSNR_CHANGED_DB
    fluxtune.set_loras(tiny_flux, [files["a"]])
    torch.testing.assert_close(run(tiny_flux), first_a, atol=1e-5, rtol=0)


def test_auto_mode_choices():
    from fluxtune.profile import validate_profile

    lo = [{"path": "x.safetensors"}]
    assert validate_profile({"loras": lo, "compile": {"mode": "regional"}}).lora_mode()[0] == "hotswap"
    assert validate_profile({"loras": lo, "transformer": {"quantize": "int8_weight"}}).lora_mode()[0] == "fuse"
    quantized_compiled = {"loras": lo, "transformer": {"quantize": "int8_weight"}, "compile": {"mode": "regional"}}
    assert validate_profile(quantized_compiled).lora_mode()[0] == "fuse"
    assert validate_profile({"loras": lo}).lora_mode()[0] == "adapter"
    assert validate_profile({"loras": ["dir/my.lora.safetensors"]}).loras[0].adapter_name == "my_lora"


def test_search_tunes_with_a_lora_in_place(files, tmp_path, monkeypatch):
    """`fluxtune search --lora FILE`: every trial (and the reference) runs with the LoRA applied, and
    the winning profile names it."""
    from fluxtune.cli import main
    from fluxtune.presets import load_profile

    monkeypatch.chdir(tmp_path)
    code = main(["search", "--model", "tiny-flux", "--steps", "2", "--budget", "12GB", "--trials", "3",
                 "--lora", files["a"], "--home", str(tmp_path / "ft"), "--out", "best.yaml", "--min-psnr", "0"])
    assert code == 0
    best = load_profile(tmp_path / "best.yaml")
    assert [lo.path for lo in best.loras] == [str(Path(files["a"]).resolve())]


# ------------------------------------------------------------------ hot-swap on a compiled transformer


def make_lora_rank(pipe, path, seed: int, r: int, alpha: int) -> str:
    """Like :func:`make_lora` with another rank and alpha; the alpha goes into the file's metadata
    (without it diffusers reads alpha = rank back)."""
    from diffusers import FluxPipeline
    from peft import LoraConfig, get_peft_model_state_dict

    t = copy.deepcopy(pipe.transformer)
    t.add_adapter(LoraConfig(r=r, lora_alpha=alpha, target_modules=TARGETS), adapter_name="x")
    g = torch.Generator().manual_seed(seed)
    for name, p in t.named_parameters():
        if "lora_B" in name:
            p.data = torch.randn(p.shape, generator=g) * 3.0
    sd = get_peft_model_state_dict(t, adapter_name="x")
    path.mkdir(parents=True, exist_ok=True)
    FluxPipeline.save_lora_weights(str(path), transformer_lora_layers=sd, weight_name=f"{path.name}.safetensors",
                                   transformer_lora_adapter_metadata={"r": r, "lora_alpha": alpha,
                                                                      "target_modules": TARGETS})
    return str(path / f"{path.name}.safetensors")


@pytest.fixture(scope="module")
def ranked(tmp_path_factory):
    """``c``: rank 2 with alpha 4 (scaling 2, where ``a`` and ``b`` have 1); ``r8``: rank 8."""
    from fluxtune.pipelines import load

    pipe = load("tiny-flux", dtype="float32")
    root = tmp_path_factory.mktemp("ranked")
    return {"c": make_lora_rank(pipe, root / "c", 5, r=2, alpha=4), "r8": make_lora_rank(pipe, root / "r8", 6, r=8, alpha=8)}


def run_at(pipe, size: int):
    return pipe("a red circle at the top left", generator=gen(), num_inference_steps=STEPS, output_type="pt",
                height=size, width=size).images


def test_switching_a_fused_lora_on_a_quantized_compiled_model_recompiles_nothing(tiny_flux, files):
    """auto on quantize + compile fuses: a switch re-quantizes from the host copy into tensors of the same
    shapes and types, so the compiled blocks run on without recompiling, and switching back is exact."""
    torch._dynamo.reset()
    try:
        report = fluxtune.apply({"transformer": {"quantize": "int8_weight"}, "compile": {"mode": "regional"}},
                                tiny_flux, loras=[files["a"]])
        assert "fuse (auto: transformer.quantize.method=int8_weight" in str(report)
        with DynamoWatch() as first:
            first_a = run(tiny_flux)
        assert first.frames > 0
        with DynamoWatch() as swaps, torch._dynamo.config.patch(error_on_recompile=True):
            fluxtune.set_loras(tiny_flux, [files["b"]])
            b = run(tiny_flux)
            fluxtune.set_loras(tiny_flux, [files["a"]])
            again_a = run(tiny_flux)
        assert (swaps.frames, swaps.recompiles) == (0, 0)
        assert psnr(b, first_a) < PSNR_CHANGED_DB
        torch.testing.assert_close(again_a, first_a, atol=0, rtol=0)
    finally:
        torch._dynamo.reset()


@pytest.mark.slow
@pytest.mark.parametrize("compile_mode", ["regional", "full"])
def test_hotswap_on_compiled_transformer_never_recompiles(tiny_flux, files, ranked, compile_mode):
    """compile + hotswap (max_rank 8): swapping in another LoRA (same rank; then a smaller rank with another
    alpha and scale) and back recompiles nothing, changes the images, and swapping back restores them."""
    from torch._dynamo.exc import RecompileError

    from fluxtune.pipelines import load

    reference = load("tiny-flux", dtype="float32")  # eager adapter: what c at 0.7 should give
    fluxtune.apply({}, reference, loras=[{"path": ranked["c"], "mode": "adapter", "scale": 0.7}])
    c_ref = run(reference)

    torch._dynamo.reset()
    try:
        report = fluxtune.apply({"compile": {"mode": compile_mode}}, tiny_flux,
                                loras=[{"path": files["a"], "mode": "hotswap", "max_rank": 8}])
        assert f"compile      transformer     {compile_mode}:" in str(report)
        assert "hot-swappable up to rank 8" in str(report)
        with DynamoWatch() as first:
            first_a = run(tiny_flux)
        assert first.frames > 0  # the transformer really was compiled on this call

        with DynamoWatch() as swaps, torch._dynamo.config.patch(error_on_recompile=True):
            fluxtune.set_loras(tiny_flux, [{"path": files["b"], "mode": "hotswap"}])
            b = run(tiny_flux)
            fluxtune.set_loras(tiny_flux, [{"path": ranked["c"], "scale": 0.7}])
            c = run(tiny_flux)
            report = fluxtune.set_loras(tiny_flux, [files["a"]])
            again_a = run(tiny_flux)
        assert (swaps.frames, swaps.recompiles) == (0, 0)
        assert "hot-swapped 1 adapter(s)" in str(report)
        assert tiny_flux.get_list_adapters() == {"transformer": ["a"]}  # one slot, swapped in place
        assert psnr(b, first_a) < PSNR_CHANGED_DB and psnr(c, b) < PSNR_CHANGED_DB
        assert psnr(c, c_ref) > PSNR_CLOSE_DB  # c's own alpha/rank and scale, not a's
        torch.testing.assert_close(again_a, first_a, atol=1e-5, rtol=0)

        # The detector fires on a real recompile. (1) Another image size under error_on_recompile: the
        # recompilation is refused (nothing gets compiled) and the counters saw it too.
        with DynamoWatch() as shape, pytest.raises(RecompileError, match="size mismatch"), \
                torch._dynamo.config.patch(error_on_recompile=True):
            run_at(tiny_flux, 32)
        assert shape.frames > 0 and shape.recompiles > 0
        # (2) What set_loras did before scalings were kept in tensors, without error_on_recompile: diffusers'
        # set_adapters writes float scalings, the compiled code guards on them, Dynamo really recompiles.
        with DynamoWatch() as floats:
            tiny_flux.set_adapters(["a"], [0.7])
            run(tiny_flux)
        assert floats.frames > 0 and floats.recompiles > 0
    finally:
        torch._dynamo.reset()


def test_hotswap_takes_the_new_lora_alpha_rank_and_scale(tiny_flux, files, ranked):
    """A swapped-in LoRA of another rank and alpha, at another scale, gives what it gives as a plain adapter."""
    from fluxtune.pipelines import load

    reference = load("tiny-flux", dtype="float32")
    fluxtune.apply({}, reference, loras=[{"path": ranked["c"], "mode": "adapter", "scale": 0.7}])
    fluxtune.apply({}, tiny_flux, loras=[{"path": files["a"], "mode": "hotswap", "max_rank": 4}])
    fluxtune.set_loras(tiny_flux, [{"path": ranked["c"], "mode": "hotswap", "scale": 0.7}])
    torch.testing.assert_close(run(tiny_flux), run(reference), atol=1e-5, rtol=0)


def test_hotswap_rank_over_max_rank_refused_and_nothing_changes(tiny_flux, files, ranked):
    from fluxtune.pipelines import load

    fluxtune.apply({}, tiny_flux, loras=[{"path": files["a"], "mode": "hotswap", "max_rank": 4}])
    first_a = run(tiny_flux)
    before, profile = _state(tiny_flux), tiny_flux._fluxtune.profile
    with pytest.raises(IncompatibleKnobsError) as err:
        fluxtune.set_loras(tiny_flux, [{"path": ranked["r8"], "mode": "hotswap"}])
    msg = str(err.value)
    assert "\n" not in msg
    assert "r8.safetensors: rank 8 exceeds the declared hot-swap max_rank=4; declare max_rank>=8" in msg
    after = _state(tiny_flux)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert tiny_flux._fluxtune.profile is profile and tiny_flux._fluxtune_lora.loaded == {"a": files["a"]}
    assert tiny_flux.get_list_adapters() == {"transformer": ["a"]}
    torch.testing.assert_close(run(tiny_flux), first_a, atol=0, rtol=0)

    fresh = load("tiny-flux", dtype="float32")  # at apply time: refused before anything is loaded
    before = _state(fresh)
    with pytest.raises(IncompatibleKnobsError, match="r8.safetensors: rank 8 exceeds max_rank=4; declare max_rank>=8"):
        fluxtune.apply({}, fresh, loras=[{"path": ranked["r8"], "mode": "hotswap", "max_rank": 4}])
    assert not fluxtune.tuning.is_tuned(fresh) and not any("lora" in n for n, _ in fresh.transformer.named_modules())
    after = _state(fresh)
    assert before.keys() == after.keys() and all(torch.equal(before[k], after[k]) for k in before)


def test_hotswap_on_a_quantized_transformer(tiny_flux, files):
    report = fluxtune.apply({"transformer": {"quantize": "int8_weight"}}, tiny_flux,
                            loras=[{"path": files["a"], "mode": "hotswap", "max_rank": 4}])
    assert "hot-swappable" in str(report)
    first_a = run(tiny_flux)
    fluxtune.set_loras(tiny_flux, [{"path": files["b"], "mode": "hotswap"}])
    assert psnr(run(tiny_flux), first_a) < PSNR_CHANGED_DB
    fluxtune.set_loras(tiny_flux, [files["a"]])
    torch.testing.assert_close(run(tiny_flux), first_a, atol=1e-5, rtol=0)
