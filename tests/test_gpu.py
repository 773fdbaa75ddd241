"""GPU tests on the full-size FLUX.1-dev replica (random weights): run with ``nox -s gpu`` or
``pytest -m gpu`` on a CUDA machine. Small images and few steps keep each test short; the speed
and memory numbers come from ``fluxtune bench`` (see the README), not from here."""

from __future__ import annotations

import gc

import pytest

torch = pytest.importorskip("torch")
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

import fluxtune  # noqa: E402
from fluxtune.errors import BudgetExceededError  # noqa: E402

GB = 10**9
SIZE = {"height": 256, "width": 256}


@pytest.fixture
def replica():
    from fluxtune.pipelines import load

    pipe = load("flux-dev-replica")
    pipe.set_progress_bar_config(disable=True)
    yield pipe
    del pipe
    gc.collect()
    torch.cuda.set_per_process_memory_fraction(1.0)
    torch.cuda.empty_cache()


def call(pipe, steps=2):
    return pipe("a red fox", num_inference_steps=steps, generator=torch.Generator().manual_seed(0),
                output_type="pt", max_sequence_length=128, **SIZE).images


def peak_after(pipe, steps=2):
    """Output and the allocator's peak of one call (allocated: what the placement really needs)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    out = call(pipe, steps)
    torch.cuda.synchronize()
    return out, torch.cuda.max_memory_allocated()


@pytest.mark.parametrize(
    ("name", "profile", "max_peak"),
    [
        ("model", {c: {"offload": "model"} for c in ("transformer", "text_encoder", "text_encoder_2", "vae")}, 26),
        ("group-leaf", {c: {"offload": {"mode": "group", "level": "leaf"}}
                        for c in ("transformer", "text_encoder", "text_encoder_2", "vae")}, 6),
        ("group-block", {**{c: {"offload": {"mode": "group", "level": "block", "use_stream": True}}
                            for c in ("transformer", "text_encoder", "text_encoder_2")},
                         "vae": {"offload": {"mode": "group", "level": "leaf"}}}, 12),
        ("partial-bf16", {"transformer": {"offload": {"mode": "partial", "resident": "6GB"}},
                          "text_encoder_2": {"offload": {"mode": "group", "level": "leaf"}}}, 12),
    ],
)
def test_offload_modes_run_and_fit(replica, name, profile, max_peak):
    ref = call(replica)
    fluxtune.apply({"name": name, **profile, "budget": {"vram": f"{max_peak}GB"}}, replica)
    out, peak = peak_after(replica)
    assert torch.isfinite(out).all()
    assert peak <= max_peak * GB, f"{name}: peak {peak / GB:.1f}GB"
    # Offloading moves weights, it does not change the maths.
    assert (out.float() - ref.float()).abs().max() < 0.05


def test_partial_residency_fp8_under_12gb(replica):
    report = fluxtune.apply({
        "budget": {"vram": "12GB"},
        "transformer": {"quantize": {"method": "fp8_dynamic", "granularity": "row"},
                        "offload": {"mode": "partial", "resident": "8GB"}},
        "text_encoder": {"offload": {"mode": "group", "level": "leaf"}},
        "text_encoder_2": {"offload": {"mode": "group", "level": "leaf"}, "quantize": "int8_weight"},
    }, replica)
    assert "partial residency" in str(report)
    out, peak = peak_after(replica)
    assert torch.isfinite(out).all() and peak <= 12 * GB


def test_sequential_offload_runs(replica):
    fluxtune.apply({c: {"offload": "sequential"} for c in ("transformer", "text_encoder", "text_encoder_2", "vae")},
                   replica)
    out, peak = peak_after(replica, steps=1)
    # bf16 weights are 31 GB; layer-by-layer offload must stay far below (8.3 GB seen on the H200:
    # T5-XXL runs its 4096-wide layers with a 512-token batch).
    assert torch.isfinite(out).all() and peak < 12 * GB


def test_quantization_and_regional_compile(replica):
    fluxtune.apply({"transformer": {"quantize": {"method": "fp8_dynamic", "granularity": "row"}},
                    "compile": {"mode": "regional", "fullgraph": True}}, replica)
    out = call(replica)
    assert torch.isfinite(out).all()
    import torch._dynamo.utils as du

    assert du.counters["stats"]["unique_graphs"] >= 1


def test_a_12gb_cap_holds(replica):
    fluxtune.apply({"budget": {"vram": "12GB"}, "transformer": {"offload": {"mode": "group", "level": "leaf"}},
                    "text_encoder_2": {"offload": {"mode": "group", "level": "leaf"}}}, replica)
    with pytest.raises(torch.OutOfMemoryError):
        torch.empty(13 * GB, dtype=torch.uint8, device="cuda")


def test_weights_over_the_cap_are_refused(replica):
    with pytest.raises(BudgetExceededError, match="budget.vram=12GB"):
        fluxtune.apply({"budget": {"vram": "12GB"}}, replica)


def test_load_from_a_saved_directory_matches_the_plain_path(tmp_path):
    """The user path on the GPU: fluxtune.load streams blocks from the checkpoint into the profile's
    placement (fp8 on the GPU, the streamed blocks into page-locked arenas) and draws what
    from_pretrained + apply draws. tiny-flux keeps it short; scripts/user_path.sh measures full size."""
    from fluxtune.pipelines import load

    load("tiny-flux", dtype="bfloat16").save_pretrained(tmp_path / "m")
    profile = {"name": "p", "family": "flux", "budget": {"vram": "8GB"},
               "transformer": {"offload": {"mode": "partial", "resident_blocks": 1},
                               "quantize": {"method": "fp8_dynamic", "granularity": "tensor"}},
               "text_encoder_2": {"offload": {"mode": "partial", "resident_blocks": 0},
                                  "quantize": {"method": "int8_weight"}},
               "generation": {"height": 64, "width": 64, "steps": 2}}
    plain = load(str(tmp_path / "m"), dtype="bfloat16")
    fluxtune.apply(profile, plain)
    a = plain("a red fox", generator=torch.Generator().manual_seed(0), output_type="pt").images
    del plain
    gc.collect()
    loaded = fluxtune.load(str(tmp_path / "m"), profile)
    text = str(fluxtune.last_report(loaded))
    assert "done on the GPU block by block while placing" in text and "page-locked host arenas" in text
    b = loaded("a red fox", generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert (a.float() - b.float()).abs().max() < 1e-2


def test_resident_quantization_stages_host_weights():
    """apply on a pipeline still on the host (a from_pretrained user's): resident components reach the GPU
    through page-locked staging and are quantized there unit by unit; they draw what the same profile
    draws on a pipeline the user moved to the GPU first (no staging)."""
    from fluxtune.pipelines import load

    profile = {"name": "p", "family": "flux", "budget": {"vram": "8GB"},
               "transformer": {"quantize": {"method": "fp8_dynamic", "granularity": "tensor"}},
               "text_encoder_2": {"quantize": {"method": "int8_weight"}},
               "generation": {"height": 64, "width": 64, "steps": 2}}
    host = load("tiny-flux", dtype="bfloat16")
    text = str(fluxtune.apply(profile, host))
    assert "through page-locked staging" in text and "done on the GPU block by block while placing" in text
    assert all(p.device.type == "cuda" for p in host.transformer.parameters())
    a = host("a red fox", generator=torch.Generator().manual_seed(0), output_type="pt").images
    moved = load("tiny-flux", dtype="bfloat16").to("cuda")
    assert "staging" not in str(fluxtune.apply(profile, moved))
    b = moved("a red fox", generator=torch.Generator().manual_seed(0), output_type="pt").images
    assert (a.float() - b.float()).abs().max() < 1e-2
