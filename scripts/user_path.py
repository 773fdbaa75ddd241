"""The real user path on a CUDA machine (issue 15): a pipeline from a save_pretrained directory.

    python scripts/user_path.py save DIR [MODEL]         # a replica (FLUX.1-dev by default), built on the GPU, saved
    python scripts/user_path.py case KIND PRESET DIR N OUT.jsonl [--cold] [--size=WxH]

KIND is ``load`` (``fluxtune.load(DIR, PRESET)``), ``plain`` (``DiffusionPipeline.from_pretrained`` then
``fluxtune.apply``) or ``leaf`` (from_pretrained then diffusers' leaf-level group offload, for scale). Each
case is one fresh process: it appends one JSON row with the time from Python's start, the load and apply
seconds, N timed generations at the preset's size and steps, and the peak host RSS of the process and
its children (sampled every 20 ms from the first line) and the NVML peak. ``--cold`` asks the kernel to
drop the checkpoint's files from the page cache first (a first load from disk); ``--size`` draws at another
size than the preset's.
"""

from __future__ import annotations

import json
import os
import sys
import time

import psutil

T_START = psutil.Process().create_time()


def _save(directory: str, model: str = "flux-dev-replica") -> None:
    from fluxtune import pipelines

    t0 = time.time()
    pipe = pipelines.load(model)
    built = time.time() - t0
    pipe.save_pretrained(directory)
    size = sum(os.path.getsize(os.path.join(r, f)) for r, _, fs in os.walk(directory) for f in fs)
    print(json.dumps({"saved": directory, "model": model, "bytes": size, "build_s": round(built, 1),
                      "save_s": round(time.time() - t0 - built, 1)}))


def _case(kind: str, preset: str, directory: str, n: int, out: str, cold: bool, size: str | None = None) -> None:
    from fluxtune.measure.sampler import Sampler

    sampler = Sampler(0)
    sampler._thread.start()
    import torch

    import fluxtune
    from fluxtune import pipelines
    from fluxtune.presets import load_profile

    torch.cuda.init()
    torch.empty(1, device="cuda")
    row: dict[str, object] = {"kind": kind, "preset": preset, "rss_after_init": sampler.host_rss(),
                              "imports_s": round(time.time() - T_START, 2)}
    if cold:
        from fluxtune.loading.checkpoint import Checkpoint

        for sub in os.listdir(directory):
            if os.path.isdir(os.path.join(directory, sub)) and any(
                    f.endswith(".safetensors") for f in os.listdir(os.path.join(directory, sub))):
                Checkpoint(os.path.join(directory, sub)).drop_cache()
        row["cold"] = True
    t0 = time.time()
    if kind == "load":
        pipe = fluxtune.load(directory, preset)
        row["load_apply_s"] = round(time.time() - t0, 2)
        rep = fluxtune.last_report(pipe)
    else:
        pipe = pipelines.load(directory)
        row["from_pretrained_s"] = round(time.time() - t0, 2)
        row["rss_after_from_pretrained"] = sampler.host_rss()
        t1 = time.time()
        if kind == "plain":
            rep = fluxtune.apply(preset, pipe)
        else:
            pipe.enable_group_offload(onload_device=torch.device("cuda"), offload_type="leaf_level", use_stream=True)
            rep = None
        torch.cuda.synchronize()
        row["apply_s"] = round(time.time() - t1, 2)
    if rep is not None:
        row["report"] = str(rep)
        row["parts"] = {f"{a.knob}/{a.component}": round(a.seconds, 2) for a in rep.actions if a.seconds >= 0.05}
    row["rss_after_apply"] = sampler.host_rss()
    kwargs = {"height": 1024, "width": 1024, "num_inference_steps": 28}
    if kind != "leaf":
        g = load_profile(preset).generation
        kwargs = {"height": g.height or 1024, "width": g.width or 1024, "num_inference_steps": g.steps or 28}
    if size:
        kwargs["width"], kwargs["height"] = (int(x) for x in size.split("x"))
    lat = []
    for i in range(n):
        t1 = time.time()
        pipe(prompt="a photo of a cat", generator=torch.Generator().manual_seed(i), **kwargs)
        torch.cuda.synchronize()
        lat.append(round(time.time() - t1, 2))
        if i == 0:
            row["first_image_since_python_start_s"] = round(time.time() - T_START, 1)
    sampler.sample()
    row.update(size=f"{kwargs['width']}x{kwargs['height']}", steps=kwargs["num_inference_steps"], latencies_s=lat,
               rss_peak=sampler.rss_peak, nvml_peak=sampler.nvml_peak,
               total_since_python_start_s=round(time.time() - T_START, 1))
    with open(out, "a") as f:
        f.write(json.dumps(row) + "\n")
    print(json.dumps({k: v for k, v in row.items() if k != "report"}))
    print(row.get("report", ""))


if __name__ == "__main__":
    if sys.argv[1] == "save":
        _save(*sys.argv[2:4])
    else:
        _, _, kind, preset, directory, n, out, *rest = sys.argv
        sizes = [a.split("=", 1)[1] for a in rest if a.startswith("--size=")]
        _case(kind, preset, directory, int(n), out, "--cold" in rest, sizes[0] if sizes else None)
