"""matmul.fp16_accumulation: the knob, its checks, its flag, its prediction and its search dimension."""

from __future__ import annotations

import optuna
import pytest
import torch

import fluxtune
from fluxtune import pipelines
from fluxtune.gpus import find_gpu
from fluxtune.hardware import HardwareInfo
from fluxtune.predict import predict_latency
from fluxtune.presets import load_profile
from fluxtune.search.space import SearchSpace
from fluxtune.tuning.base import Context
from fluxtune.tuning.matmul import MatmulHandler
from fluxtune.tuning.report import ApplyReport

GEN = {"height": 64, "width": 64, "steps": 2}
FP16ACC = {"transformer": {"dtype": "float16"}, "matmul": {"fp16_accumulation": True}, "generation": GEN}


def _card(name: str) -> HardwareInfo:
    return HardwareInfo.of_card(find_gpu(name), host_ram_bytes=64 * 2**30, cpu_count=8)


def test_the_rate_is_twice_bf16_on_geforce_and_the_same_on_data_center_cards() -> None:
    assert find_gpu("RTX 3090").rate("fp16acc") == pytest.approx(142.0)  # GA102 whitepaper: 142 / 71
    assert find_gpu("RTX 4090").rate("fp16acc") == pytest.approx(330.3)  # Ada whitepaper: 330.3 / 165.2
    assert find_gpu("A10G").rate("fp16acc") == pytest.approx(2 * find_gpu("A10G").rate("bf16"), rel=0.01)
    for name in ("H100", "A100 80GB", "L4"):
        assert find_gpu(name).rate("fp16acc") == pytest.approx(find_gpu(name).rate("bf16"), rel=0.01)


def test_without_a_float16_component_it_is_refused_before_anything_changes() -> None:
    pipe = pipelines.load("tiny-flux", dtype="float32")
    with pytest.raises(fluxtune.FluxtuneError,
                       match=r"matmul.fp16_accumulation=true: no component runs float16 GEMMs \(transformer float32"):
        fluxtune.apply({"matmul": {"fp16_accumulation": True}, "text_encoder_2": {"quantize": "int8_weight"},
                        "generation": GEN}, pipe)
    assert type(pipe.text_encoder_2.encoder.block[0].layer[1].DenseReluDense.wo.weight) is torch.nn.Parameter
    # int8_dynamic GEMMs take int8 inputs: the flag would not reach them.
    with pytest.raises(fluxtune.FluxtuneError, match="no fp8_dynamic/int8_dynamic on it"):
        fluxtune.apply({**FP16ACC, "transformer": {"dtype": "float16", "quantize": "int8_dynamic"}}, pipe)


def test_on_cpu_it_is_a_reported_skip_and_the_image_is_the_float16_one() -> None:
    pipe = pipelines.load("tiny-flux", dtype="float32")
    report = str(fluxtune.apply(FP16ACC, pipe))
    assert "fp16 accumulation is a cuBLAS setting: no effect on CPU" in report
    assert pipe.transformer.dtype == torch.float16 and pipe.text_encoder_2.dtype == torch.float32
    image = pipe(prompt="a red fox", generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert torch.isfinite(image).all()
    with pytest.raises(fluxtune.FluxtuneError, match="strict=True"):
        fluxtune.apply(FP16ACC, pipelines.load("tiny-flux", dtype="float32"), strict=True)


def test_on_a_gpu_the_handler_sets_torchs_flag_and_undo_restores_it() -> None:
    """The flag is torch's own (it exists in a CPU build too); the context says the device is a GPU."""
    flag = torch.backends.cuda.matmul
    assert flag.allow_fp16_accumulation is False
    pipe = pipelines.load("tiny-flux", dtype="float16")
    ctx = Context(pipe=pipe, profile=load_profile({**FP16ACC, "name": "t"}), hardware=_card("RTX 3090"),
                  device=torch.device("cuda"), family="flux", report=ApplyReport("t", "cuda"))
    handler = MatmulHandler()
    assert handler.check(ctx) == []
    try:
        handler.apply(ctx)
        assert flag.allow_fp16_accumulation is True
        assert "RTX 3090: 142 against 71 dense TFLOPS" in str(ctx.report)
        for _, undo in reversed(ctx.undo):
            undo()
        assert flag.allow_fp16_accumulation is False
    finally:
        flag.allow_fp16_accumulation = False
    ctx.hardware = _card("H100")
    handler.apply(ctx)
    flag.allow_fp16_accumulation = False
    assert "H100 runs float32 accumulate at the same rate: numerics change, speed does not" in str(ctx.report)


def test_predicted_faster_on_geforce_ampere_only_for_a_float16_transformer() -> None:
    base = {"name": "p", "family": "flux", "transformer": {"quantize": "int8_weight"},
            "generation": {"height": 1024, "width": 1024, "steps": 28}}
    fp16 = {**base, "transformer": {"quantize": "int8_weight", "dtype": "float16"}}
    on = {**fp16, "matmul": {"fp16_accumulation": True}}
    flag_only = {**base, "matmul": {"fp16_accumulation": True}}

    def seconds(profile: dict, gpu: str) -> float:
        return predict_latency(load_profile(profile), find_gpu(gpu), model="flux-dev-replica").total_s

    rtx = {name: seconds(p, "RTX 3090") for name, p in (("base", base), ("fp16", fp16), ("on", on), ("flag", flag_only))}
    assert rtx["fp16"] == rtx["base"] == rtx["flag"]  # float16 alone, or the flag alone, changes no rate
    assert rtx["on"] < 0.8 * rtx["base"]
    assert predict_latency(load_profile(on), find_gpu("RTX 3090"), model="flux-dev-replica").step.precision == "fp16acc"
    h100 = seconds(on, "H100") / seconds(base, "H100")
    assert h100 > 0.99  # the same rate there; the published efficiency ratio makes it no faster


def test_the_search_tries_it_where_it_pays() -> None:
    base = load_profile({"name": "base", "family": "flux", "generation": {"steps": 28}})

    def dim(hw: HardwareInfo) -> tuple:
        space = SearchSpace.create(hw, "flux", base, transformer_bytes=int(12e9))
        return next(d for d in space.dims if d.name == "transformer.fp16_accumulation").choices

    assert dim(_card("RTX 3090")) == (False, True) and dim(_card("RTX 4060")) == (False, True)
    assert dim(_card("H100")) == (False,) and dim(_card("L4")) == (False,)
    space = SearchSpace.create(_card("RTX 3090"), "flux", base, {"transformer.fp16_accumulation": True,
                                                                 "transformer.quantize": "int8_weight"},
                               transformer_bytes=int(12e9))
    profile = space.suggest(optuna.create_study().ask())
    assert profile.transformer.dtype == "float16" and profile.matmul.fp16_accumulation
    assert profile.text_encoder_2.dtype is None  # T5 overflows in float16: it keeps the loaded dtype
