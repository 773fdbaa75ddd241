"""fluxtune.measure on the tiny CPU pipelines: timings, statuses, quality and references."""

from __future__ import annotations

import json

import pytest
import torch

from fluxtune import pipelines
from fluxtune.errors import FluxtuneError, ProfileError
from fluxtune.measure import (
    DEFAULT_CLASS_LABELS,
    DEFAULT_PROMPTS,
    PSNR_CAP,
    Measurement,
    Reference,
    Workload,
    classify_peak,
    compare,
    measure,
    quality_drop,
)

STEPS = 4


@pytest.fixture(scope="module")
def flux() -> object:
    return pipelines.load("tiny-flux", dtype="float32")


@pytest.fixture(scope="module")
def dit() -> object:
    return pipelines.load("tiny-dit", dtype="float32")


@pytest.fixture(scope="module")
def flux_workload() -> Workload:
    return Workload(prompts=DEFAULT_PROMPTS[:2], seeds=(0,), steps=STEPS, runs=2, warmup=1)


@pytest.fixture(scope="module")
def flux_run(flux: object, flux_workload: Workload) -> Measurement:
    return measure(flux, flux_workload)


# ------------------------------------------------------------------------------------- measure


def test_measure_flux_ok(flux: object, flux_run: Measurement, flux_workload: Workload) -> None:
    m = flux_run
    assert m.status == "ok", m.error
    assert m.error is None
    assert m.calls_per_run == 2
    assert len(m.latency_runs) == flux_workload.runs * 2
    assert all(t > 0 for t in m.latency_runs)
    assert m.latency_s is not None and m.latency_s > 0
    assert m.first_call_s is not None and m.first_call_s > 0
    assert len(m.warmup_s) == 1
    assert m.steps == STEPS and len(m.step_times) == STEPS
    assert m.step_s is not None and m.step_s > 0
    assert m.text_encode_s is not None and m.text_encode_s > 0
    assert m.decode_s is not None and m.decode_s > 0
    assert m.denoise_s is not None and 0 < m.denoise_s < max(m.latency_runs)
    # CPU: no allocator or NVML peaks, but the host peak is sampled.
    assert m.peak_allocated is None and m.peak_reserved is None and m.peak_nvml is None
    assert m.host_ram_peak is not None and m.host_ram_peak > 0
    assert m.images is not None and m.images.shape == (2, 3, 64, 64)
    assert m.images.dtype == torch.float32
    assert float(m.images.min()) >= 0.0 and float(m.images.max()) <= 1.0
    assert m.latents is not None and m.latents.shape[0] == 2
    # The instrumentation is gone afterwards.
    assert "encode_prompt" not in vars(flux)
    assert "step" not in vars(flux.scheduler)  # type: ignore[attr-defined]


def test_measurement_to_dict_is_json(flux_run: Measurement) -> None:
    d = flux_run.to_dict()
    text = json.dumps(d, allow_nan=False)
    assert "images" not in d and d["images_shape"] == [2, 3, 64, 64]
    back = Measurement.from_dict(json.loads(text))
    assert back.latency_s == flux_run.latency_s and back.images is None
    assert back.workload == flux_run.workload


def test_same_seeds_give_identical_images(flux: object, flux_run: Measurement, flux_workload: Workload) -> None:
    again = measure(flux, Workload(**{**flux_workload.to_dict(), "runs": 1, "warmup": 0}))
    assert again.status == "ok"
    q = compare(again, flux_run)
    assert q["psnr"] == PSNR_CAP
    assert q["ssim"] == pytest.approx(1.0)
    assert q["max_abs"] == 0.0 and q["latent_rmse"] == 0.0 and q["resized"] == 0.0


def test_fewer_steps_lower_psnr(flux: object, flux_run: Measurement, flux_workload: Workload) -> None:
    fewer = measure(flux, Workload(**{**flux_workload.to_dict(), "steps": 1, "runs": 1, "warmup": 0}))
    assert fewer.status == "ok" and fewer.steps == 1
    q = compare(fewer, flux_run)
    assert q["psnr"] < PSNR_CAP - 1
    assert q["latent_rmse"] > 0
    assert q["ssim"] < 1.0


def test_measure_dit(dit: object) -> None:
    wl = Workload.for_pipeline(dit, class_labels=(1, 2, 3), steps=3, runs=1, warmup=0)
    m = measure(dit, wl)
    assert m.status == "ok", m.error
    assert m.steps == 3 and m.calls_per_run == 1
    assert m.text_encode_s is None  # DiT encodes no text
    assert m.images is not None and m.images.shape == (3, 3, 128, 128)
    # DiT steps a CFG-doubled batch; the captured latents are the decoded half.
    assert m.latents is not None and m.latents.shape == (3, 4, 16, 16)
    assert "step" not in vars(dit.scheduler)  # type: ignore[attr-defined]


@pytest.mark.parametrize("which", ["flux", "dit"])
def test_a_call_projected_over_the_limit_stops_after_its_first_warm_steps(
        which: str, flux: object, dit: object) -> None:
    """Multi-fidelity (issue 17): the warm-up call is stopped at step 4 (the first step skipped, three
    warm ones timed); the measurement is ``pruned`` with a projection and no images; the pipeline
    still renders afterwards, and a generous limit changes nothing."""
    pipe = flux if which == "flux" else dit
    wl = (Workload(prompts=DEFAULT_PROMPTS[:1], seeds=(0,), steps=12, runs=2, warmup=1) if which == "flux"
          else Workload(class_labels=(1,), steps=12, runs=2, warmup=1))
    steps: list[int] = []
    sched = pipe.scheduler  # type: ignore[attr-defined]
    original = type(sched).step

    def counted(self: object, *a: object, **k: object) -> object:
        steps.append(1)
        return original(self, *a, **k)

    type(sched).step = counted  # type: ignore[method-assign]
    try:
        m = measure(pipe, wl, stop_above_s=1e-9)
    finally:
        type(sched).step = original  # type: ignore[method-assign]
    assert m.status == "pruned" and m.images is None and not m.latency_runs, m.error
    assert m.projected_latency_s is not None and m.projected_latency_s > 0 and "projected" in (m.error or "")
    assert len(steps) == 4  # stopped inside the warm-up, not after 12 + 2 x 12 steps
    full = measure(pipe, wl, stop_above_s=1e6)
    assert full.status == "ok" and full.projected_latency_s is None and full.images is not None


def test_keep_images_false_and_progress(dit: object) -> None:
    lines: list[str] = []
    m = measure(dit, Workload(class_labels=(1,), steps=2, runs=2, warmup=1), keep_images=False,
                progress=lines.append)
    assert m.status == "ok"
    assert m.images is None and m.latents is None
    assert lines[0].startswith("warm-up") and any(line.startswith("run 2/2") for line in lines)


@pytest.mark.parametrize(
    ("exc", "status"),
    [
        (torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB"), "oom"),
        (RuntimeError("CUDA out of memory. Tried to allocate 20.00 MiB"), "oom"),
        (ValueError("shapes do not match\nsecond line"), "error"),
    ],
)
def test_failures_are_statuses(dit: object, monkeypatch: pytest.MonkeyPatch, exc: Exception, status: str) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise exc

    monkeypatch.setattr(dit.transformer, "forward", boom)  # type: ignore[attr-defined]
    m = measure(dit, Workload(class_labels=(1,), steps=2, runs=1, warmup=1))
    assert m.status == status
    assert m.error is not None and type(exc).__name__ in m.error and "\n" not in m.error
    assert "step" not in vars(dit.scheduler)  # type: ignore[attr-defined]
    monkeypatch.undo()
    assert measure(dit, Workload(class_labels=(1,), steps=1, runs=1, warmup=0)).status == "ok"


def test_failure_in_text_encoder_restores_pipeline(flux: object, monkeypatch: pytest.MonkeyPatch) -> None:
    def boom(*args: object, **kwargs: object) -> None:
        raise torch.OutOfMemoryError("CUDA out of memory")

    monkeypatch.setattr(flux.text_encoder_2, "forward", boom)  # type: ignore[attr-defined]
    m = measure(flux, Workload(prompts=("a cat",), steps=1, runs=1, warmup=0))
    assert m.status == "oom" and (m.error or "").startswith("during text encoding: OutOfMemoryError")
    assert "encode_prompt" not in vars(flux)


@pytest.mark.parametrize(("component", "nth", "where"), [("transformer", 2, "denoising step 2"),
                                                         ("vae", 1, "VAE decoding")])
def test_an_out_of_memory_error_says_where_in_the_call_it_ran_out(
        flux: object, monkeypatch: pytest.MonkeyPatch, component: str, nth: int, where: str) -> None:
    module = getattr(flux, component)
    method = "decode" if component == "vae" else "forward"
    original, calls = getattr(module, method), []

    def fails_on_nth(*args: object, **kwargs: object) -> object:
        calls.append(1)
        if len(calls) == nth:
            raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 640.00 MiB")
        return original(*args, **kwargs)

    monkeypatch.setattr(module, method, fails_on_nth)
    m = measure(flux, Workload(prompts=("a cat",), steps=3, runs=1, warmup=0))
    assert m.status == "oom" and (m.error or "").startswith(f"during {where}: OutOfMemoryError"), m.error


def test_workload_the_pipeline_cannot_take_is_an_error(dit: object) -> None:
    m = measure(dit, Workload(class_labels=(1,), height=64, steps=1, runs=1, warmup=0))
    assert m.status == "error" and "height" in (m.error or "")
    m = measure(dit, Workload(prompts=("a cat",), steps=1, runs=1, warmup=0))
    assert m.status == "error" and "class_labels" in (m.error or "")


def test_applied_profile_defaults_are_not_overridden() -> None:
    import fluxtune
    from fluxtune.profile import validate_profile

    pipe = pipelines.load("tiny-flux", dtype="float32")
    fluxtune.apply(validate_profile({"generation": {"steps": 3, "height": 32, "width": 32}}), pipe)
    m = measure(pipe, Workload.for_pipeline(pipe, prompts=("a cat",), runs=1, warmup=0))
    assert m.status == "ok", m.error
    assert m.steps == 3 and m.images is not None and m.images.shape == (1, 3, 32, 32)
    # An explicit workload value still wins over the profile's default.
    m = measure(pipe, Workload.for_pipeline(pipe, prompts=("a cat",), steps=2, runs=1, warmup=0))
    assert m.steps == 2


def test_budget_on_cpu_is_never_over(dit: object) -> None:
    m = measure(dit, Workload(class_labels=(1,), steps=1, runs=1, warmup=0), budget_bytes=1)
    assert m.status == "ok"  # no device peak is known on CPU


def test_classify_peak() -> None:
    gb = 10**9
    assert classify_peak(None, None, gb) == "ok"
    assert classify_peak(2 * gb, None, None) == "ok"
    assert classify_peak(2 * gb, None, gb) == "over_budget"
    assert classify_peak(gb // 2, 2 * gb, gb) == "over_budget"  # the budget is the whole process, context included
    assert classify_peak(gb // 2, gb, gb) == "ok"
    assert classify_peak(None, 2 * gb, gb) == "over_budget"


# ------------------------------------------------------------------------------------ workload


def test_workload_roundtrip_and_validation() -> None:
    wl = Workload(prompts=("a", "b"), seeds=[1, 2], steps=8, height=64, width=64, runs=2)  # type: ignore[arg-type]
    assert wl.seeds == (1, 2) and wl.calls_per_run == 4
    d = wl.to_dict()
    assert json.loads(json.dumps(d)) == d and d["prompts"] == ["a", "b"]
    assert Workload.from_dict(d) == wl
    with pytest.raises(ProfileError, match="runs"):
        Workload(runs=0)
    with pytest.raises(ProfileError, match="unknown key 'step'"):
        Workload.from_dict({"step": 4})
    with pytest.raises(ProfileError, match="not both"):
        Workload(prompts=("a",), class_labels=(1,))
    with pytest.raises(ProfileError, match="seeds"):
        Workload(seeds=())


def test_workload_for_pipeline(flux: object, dit: object) -> None:
    f = Workload.for_pipeline(flux)
    assert f.prompts == DEFAULT_PROMPTS and not f.class_labels and f.steps is None
    d = Workload.for_pipeline(dit, steps=5)
    assert d.class_labels == DEFAULT_CLASS_LABELS and not d.prompts and d.steps == 5
    assert Workload.for_pipeline(dit, class_labels=(3,), images_per_prompt=2).calls(dit)[0][1]["class_labels"] == [3, 3]
    with pytest.raises(ProfileError, match="unknown key"):
        Workload.for_pipeline(flux, step=3)
    seeds_kwargs = Workload.for_pipeline(flux, prompts=("x", "y"), seeds=(0, 1)).calls(flux)
    assert [(s, k["prompt"]) for s, k in seeds_kwargs] == [(0, "x"), (1, "x"), (0, "y"), (1, "y")]
    assert "num_inference_steps" not in seeds_kwargs[0][1]  # unset = the pipeline's (profile's) default


# ------------------------------------------------------------------------------------- quality


def _fake(images: torch.Tensor, latents: torch.Tensor | None = None) -> Measurement:
    return Measurement(images=images, latents=latents)


def test_compare_resizes_and_flags() -> None:
    torch.manual_seed(0)
    ref = torch.rand(2, 3, 64, 64)
    small = torch.nn.functional.interpolate(ref, size=(32, 32), mode="bilinear", align_corners=False)
    q = compare(_fake(small), _fake(ref))
    assert q["resized"] == 1.0
    assert 5 < q["psnr"] < PSNR_CAP
    noisy = (ref + 0.05 * torch.randn_like(ref)).clamp(0, 1)
    q2 = compare(_fake(noisy), _fake(ref))
    assert q2["resized"] == 0.0 and 20 < q2["psnr"] < 40 and q2["ssim"] < 1.0


def test_compare_tiny_images_and_latents() -> None:
    img = torch.rand(1, 3, 8, 8)
    q = compare(_fake(img, torch.ones(1, 4)), _fake(img.clone(), torch.ones(1, 4) * 2))
    assert q["psnr"] == PSNR_CAP and q["ssim"] == pytest.approx(1.0)  # 7x7 kernel on 8x8 images
    assert q["latent_rmse"] == pytest.approx(0.5)
    q = compare(_fake(torch.rand(1, 3, 2, 2)), _fake(torch.rand(1, 3, 2, 2)))
    assert "ssim" not in q and "psnr" in q
    assert "latent_rmse" not in compare(_fake(img, torch.ones(1, 4)), _fake(img, torch.ones(1, 5)))
    assert compare(Measurement(), _fake(img)) == {}


def test_compare_different_counts_raises() -> None:
    with pytest.raises(FluxtuneError, match="same workload"):
        compare(_fake(torch.rand(2, 3, 8, 8)), _fake(torch.rand(3, 3, 8, 8)))


def test_quality_drop_and_floor() -> None:
    q = {"psnr": 30.0, "ssim": 0.9, "latent_rmse": 0.1, "max_abs": 0.5, "resized": 0.0}
    drop = quality_drop(q, {"psnr": 40.0, "ssim": 0.99, "latent_rmse": 0.02})
    assert drop == pytest.approx({"psnr_drop": 10.0, "ssim_drop": 0.09, "latent_rmse_excess": 0.08,
                                  "max_abs_excess": 0.5})
    assert quality_drop({"psnr": 100.0}, {}) == {"psnr_drop": 0.0}
    ref = Reference(images=torch.zeros(1, 3, 4, 4), latents=None, workload=Workload(),
                    noise_floor={"psnr": 60.0, "ssim": 0.999, "max_abs": 0.01},
                    compiled_floor={"psnr": 35.0, "ssim": 0.995, "latent_rmse": 0.03})
    assert ref.floor == {"psnr": 35.0, "ssim": 0.995, "max_abs": 0.01, "latent_rmse": 0.03}


def test_reference_roundtrip(tmp_path: object, flux: object, flux_run: Measurement,
                             flux_workload: Workload) -> None:
    second = measure(flux, Workload(**{**flux_workload.to_dict(), "runs": 1, "warmup": 0}))
    ref = Reference.from_runs(flux_run, second, workload=flux_workload, info={"model": "tiny-flux"})
    assert ref.noise_floor["psnr"] == PSNR_CAP  # CPU runs are exact
    path = tmp_path / "refs" / "tiny.pt"  # type: ignore[operator]
    sidecar = ref.save(path)
    assert sidecar.name == "tiny.json" and path.exists()
    meta = json.loads(sidecar.read_text())
    assert meta["workload"] == flux_workload.to_dict() and meta["info"] == {"model": "tiny-flux"}
    loaded = Reference.load(path)
    assert torch.equal(loaded.images, ref.images)
    assert loaded.latents is not None and torch.equal(loaded.latents, ref.latents)
    assert loaded.workload == flux_workload and loaded.noise_floor == ref.noise_floor
    assert loaded.compare(flux_run)["psnr"] == PSNR_CAP
    # measure() with a reference fills quality, drops included.
    m = measure(flux, Workload(**{**flux_workload.to_dict(), "steps": 2, "runs": 1, "warmup": 0}),
                reference=loaded)
    assert m.status == "ok" and m.quality["psnr"] < PSNR_CAP and m.quality["psnr_drop"] > 0
    with pytest.raises(FluxtuneError, match="does not exist"):
        Reference.load(tmp_path / "missing.pt")  # type: ignore[operator]


def test_reference_needs_images() -> None:
    with pytest.raises(FluxtuneError, match="no images"):
        Reference.from_runs(Measurement(status="oom", error="x"), workload=Workload())


# ----------------------------------------------------------------------------------------- GPU


@pytest.mark.gpu
def test_measure_on_cuda_records_peaks_and_budget() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pipe = pipelines.load("tiny-dit", device="cuda", dtype="bfloat16")
    wl = Workload(class_labels=(1, 2), steps=3, runs=2, warmup=1)
    m = measure(pipe, wl)
    assert m.status == "ok", m.error
    assert m.device.startswith("cuda")
    assert m.peak_allocated is not None and 0 < m.peak_allocated <= (m.peak_reserved or 0)
    assert m.steps == 3 and m.step_s is not None and m.step_s > 0 and m.decode_s is not None
    assert m.images is not None and m.images.device.type == "cpu"
    over = measure(pipe, wl, budget_bytes=1)
    assert over.status == "over_budget" and "budget" in (over.error or "")


@pytest.mark.gpu
def test_measure_on_cuda_oom_under_a_cap() -> None:
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA GPU")
    pipe = pipelines.load("tiny-dit", device="cuda", dtype="bfloat16")
    total = torch.cuda.get_device_properties(0).total_memory
    torch.cuda.empty_cache()
    torch.cuda.set_per_process_memory_fraction(max(torch.cuda.memory_reserved(0), 2**20) / total, 0)
    try:
        m = measure(pipe, Workload(class_labels=tuple(range(64)), steps=2, runs=1, warmup=0))
    finally:
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
    assert m.status == "oom" and "OutOfMemoryError" in (m.error or "")


def test_short_warmup_and_time_box(dit: object, monkeypatch: pytest.MonkeyPatch) -> None:
    import fluxtune.measure.timing as fm

    steps_seen: list[int] = []
    real = fm._one_call

    def counting(pipe: object, inst: object, device: object, seed: int, kwargs: dict, keep: bool,
                 **rest: object) -> object:
        steps_seen.append(kwargs["num_inference_steps"])
        return real(pipe, inst, device, seed, kwargs, keep, **rest)  # type: ignore[arg-type]

    monkeypatch.setattr(fm, "_one_call", counting)
    wl = Workload(class_labels=(1,), steps=4, runs=5, warmup=1, warmup_steps=1)
    # A box far larger than the calls: every run happens; the warm-up ran 1 step, the runs 4.
    m = measure(dit, wl, time_box_s=1e6)
    assert m.status == "ok" and steps_seen == [1, 4, 4, 4, 4, 4] and len(m.latency_runs) == 5
    assert m.images is not None  # kept, whichever run is the last
    # A box smaller than one call: exactly one timed run, its images kept.
    steps_seen.clear()
    m = measure(dit, wl, time_box_s=1e-6)
    assert steps_seen == [1, 4] and len(m.latency_runs) == 1 and m.images is not None
    with pytest.raises(ProfileError, match="warmup_steps=0"):
        Workload(class_labels=(1,), warmup_steps=0)
