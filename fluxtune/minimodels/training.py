"""Training of flux-mini and dit-mini (run through `scripts/train_minimodels.py`).

Order: render a data set of scenes -> train the VAE (reconstruction + a small KL) -> freeze it and
measure the latent statistics (FLUX's shift/scaling factors) -> train flux-mini's transformer and
both text encoders with the rectified-flow loss -> train dit-mini's transformer with the epsilon
loss -> save both pipelines with `save_pretrained`, reload them with `from_pretrained`, and render
the evaluation prompts through the standard pipeline calls (adherence printed, sample grids saved).

What makes a standard pipeline call reproduce training:
* flux-mini: latents packed with `FluxPipeline._pack_latents`, image ids from
  `_prepare_latent_image_ids`, text ids zero; the transformer gets timestep = sigma (the pipeline
  passes t / 1000 with t = 1000 * sigma); x_sigma = (1 - sigma) * x0 + sigma * noise and the target
  velocity noise - x0, which is what `FlowMatchEulerDiscreteScheduler.step` integrates; no dynamic
  shifting (`shift` fixed in the scheduler config, and the trainer samples sigmas through the same
  shift); text tokenized exactly as `encode_prompt` does (CLIP to 77 tokens and pooled at eos, T5
  padded to max_sequence_length, which the trainer varies from MIN_SEQUENCE_LENGTH to 512).
* dit-mini: epsilon prediction on the `DDIMScheduler`'s own `alphas_cumprod`; labels dropped to the
  null id 1000 (what `DiTPipeline` uses for guidance) for 10% of samples, once per sample (the
  transformer's own per-block label dropout is off because it runs in eval mode).
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import multiprocessing
import os
import time
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F

from fluxtune.minimodels import domain
from fluxtune.minimodels.adherence import mean_adherence
from fluxtune.minimodels.models import (
    IMAGE_SIZE,
    MIN_SEQUENCE_LENGTH,
    build_dit_mini,
    build_flux_mini,
    build_vae,
    param_count,
)

MAX_SEQUENCE_LENGTH = 512
CAPTION_DROPOUT = 0.1  # empty prompt, so true CFG (negative_prompt="") has an unconditional model
LABEL_DROPOUT = 0.1
NULL_CLASS = 1000  # hard-coded in DiTPipeline


@dataclass
class TrainConfig:
    """Everything a training run depends on (saved next to the checkpoints)."""

    out: str
    device: str = "cpu"
    which: str = "both"
    seed: int = 0
    dataset_size: int = 40_000
    vae_steps: int = 3_000
    vae_batch: int = 64
    vae_lr: float = 1e-3
    vae_kl: float = 1e-5
    steps: int = 10_000
    batch: int = 128
    dit_batch: int = 256
    lr: float = 6e-4
    warmup: int = 200
    ema: float = 0.999
    minutes: float | None = 7.0
    max_seq_len: int = MAX_SEQUENCE_LENGTH
    eval_steps: int = 28
    eval_seeds: int = 2
    log_every: int = 100
    workers: int = 0
    vae: str | None = None
    budget_split: dict[str, float] = field(default_factory=lambda: {"vae": 0.12, "flux": 0.60, "dit": 0.28})


# ------------------------------------------------------------------------------------------ data


def render_dataset(n: int, seed: int, workers: int = 0) -> tuple[list[domain.Scene], np.ndarray]:
    """`n` random scenes and their jittered renders (uint8 N x H x W x 3)."""
    scenes = domain.sample_scenes(n, seed)
    chunk = 2_000
    starts = range(0, n, chunk)
    batches = [scenes[i : i + chunk] for i in starts]
    seeds = [seed * 100_003 + i for i in starts]
    if workers > 1 and len(batches) > 1:
        # spawn, not fork: the parent may hold CUDA state; the children import only numpy code.
        with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
            parts = list(pool.map(domain.render_batch, batches, [IMAGE_SIZE] * len(batches), seeds))
    else:
        parts = [domain.render_batch(b, IMAGE_SIZE, s) for b, s in zip(batches, seeds, strict=True)]
    return scenes, np.concatenate(parts)


def tokenize_captions(
    pipe: Any, scenes: Sequence[domain.Scene]
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Token ids of every template's caption of every distinct scene, tokenized as
    FluxPipeline.encode_prompt does: CLIP (U, T, 77), T5 (U, T, MIN_SEQUENCE_LENGTH) (pad further
    with the pad id, 0), and for each scene its row in those tables (N,).

    Raises:
        ValueError: a caption needs more than MIN_SEQUENCE_LENGTH T5 tokens.
    """
    n_t = len(domain.TEMPLATES)
    # Captions do not depend on the render jitter: tokenize each distinct scene once (<= 5040 of them).
    unique = sorted(set(scenes), key=lambda s: (s.shape, s.color, s.background, s.position, s.size))
    row = {s: i for i, s in enumerate(unique)}
    captions = [domain.caption(s, t) for s in unique for t in range(n_t)]
    clip_ids, t5_ids = tokenize(pipe, captions, MIN_SEQUENCE_LENGTH)
    rows = torch.tensor([row[s] for s in scenes])
    return clip_ids.view(len(unique), n_t, -1), t5_ids.view(len(unique), n_t, -1), rows


def tokenize(pipe: Any, prompts: Sequence[str], t5_length: int) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP and T5 ids of prompts, with the arguments FluxPipeline uses."""
    clip = pipe.tokenizer(
        list(prompts),
        padding="max_length",
        max_length=pipe.tokenizer_max_length,
        truncation=True,
        return_tensors="pt",
    ).input_ids
    t5 = pipe.tokenizer_2(
        list(prompts), padding="max_length", max_length=t5_length, truncation=True, return_tensors="pt"
    ).input_ids
    eos = pipe.tokenizer_2.eos_token_id
    if not bool((t5 == eos).any(dim=1).all()):
        raise ValueError(f"a caption is longer than {t5_length} T5 tokens; raise MIN_SEQUENCE_LENGTH")
    return clip, t5


def encode_text(pipe: Any, clip_ids: torch.Tensor, t5_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(T5 sequence embeddings, CLIP pooled embedding), as FluxPipeline.encode_prompt computes them."""
    pooled = pipe.text_encoder(clip_ids, output_hidden_states=False).pooler_output
    seq = pipe.text_encoder_2(t5_ids, output_hidden_states=False)[0]
    return seq, pooled


# ------------------------------------------------------------------------------------- training


class Schedule:
    """Linear warm-up then cosine decay to 10%, over progress = max(step share, time share), so a
    run with a time budget still ends its schedule when the budget ends."""

    def __init__(self, steps: int, seconds: float | None, warmup: int, lr: float) -> None:
        self.steps, self.seconds, self.warmup, self.lr = steps, seconds, warmup, lr
        self.start = time.perf_counter()

    def progress(self, step: int) -> float:
        p = step / max(1, self.steps)
        if self.seconds:
            p = max(p, (time.perf_counter() - self.start) / self.seconds)
        return min(1.0, p)

    def done(self, step: int) -> bool:
        return self.progress(step) >= 1.0

    def rate(self, step: int) -> float:
        warm = min(1.0, (step + 1) / max(1, self.warmup))
        return self.lr * warm * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * self.progress(step))))


class Ema:
    """Exponential moving average of parameters (what gets saved: it samples better than the raw weights)."""

    def __init__(self, params: list[torch.nn.Parameter], decay: float) -> None:
        self.params = params
        self.shadow = [p.detach().clone().float() for p in params]
        self.decay = decay

    @torch.no_grad()
    def update(self, step: int) -> None:
        d = min(self.decay, (1 + step) / (10 + step))
        torch._foreach_lerp_(self.shadow, [p.detach().float() for p in self.params], 1 - d)

    @torch.no_grad()
    def copy_to(self) -> None:
        for p, s in zip(self.params, self.shadow, strict=True):
            p.copy_(s)


def _autocast(device: torch.device) -> Any:
    # FLUXTUNE_TRAIN_FP32=1 trains in fp32 (TF32 matmuls) on CUDA: on the H200 image (torch 2.11,
    # CUDA 13) a bf16 autocast backward of flux-mini failed with CUBLAS_STATUS_EXECUTION_FAILED.
    if os.environ.get("FLUXTUNE_TRAIN_FP32") == "1":
        torch.backends.cuda.matmul.allow_tf32 = True
        return torch.autocast(device.type, enabled=False)
    if device.type == "cuda":
        return torch.autocast("cuda", dtype=torch.bfloat16)
    return torch.autocast("cpu", enabled=False)


def _loop(
    name: str,
    params: list[torch.nn.Parameter],
    loss_fn: Callable[[int], torch.Tensor],
    steps: int,
    seconds: float | None,
    lr: float,
    warmup: int,
    log_every: int,
    ema: float | None,
) -> tuple[list[tuple[int, float]], Ema | None]:
    """Generic AdamW loop with grad clipping, EMA and the progress schedule. Returns the loss curve."""
    fused = all(p.is_cuda for p in params)  # one kernel for the whole update: these models are launch-bound
    opt = torch.optim.AdamW(params, lr=lr, betas=(0.9, 0.99), weight_decay=0.0, fused=fused)
    sched = Schedule(steps, seconds, warmup, lr)
    averager = Ema(params, ema) if ema else None
    curve: list[tuple[int, float]] = []
    step, t0 = 0, time.perf_counter()
    # Loss summed on the device since the last log line (no host sync per step: at these model sizes
    # the GPU would otherwise wait for Python); the curve holds the mean of each window.
    window_sum: torch.Tensor | float = 0.0
    window_n = 0
    while not sched.done(step):
        for g in opt.param_groups:
            g["lr"] = sched.rate(step)
        loss = loss_fn(step)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        opt.step()
        if averager:
            averager.update(step)
        step += 1
        window_sum = window_sum + loss.detach()
        window_n += 1
        if step % log_every == 0 or step == 1:
            mean = float(window_sum) / window_n
            curve.append((step, mean))
            window_sum, window_n = 0.0, 0
            el = time.perf_counter() - t0
            print(
                f"[{name}] step {step:6d}  loss {mean:.5f}  lr {sched.rate(step):.2e}  "
                f"{step / el:6.1f} it/s  {el:6.0f}s",
                flush=True,
            )
    if window_n:
        curve.append((step, float(window_sum) / window_n))
    print(
        f"[{name}] done: {step} steps in {time.perf_counter() - t0:.0f}s, loss {curve[-1][1]:.5f}", flush=True
    )
    return curve, averager


def _batches(n: int, batch: int, device: torch.device, generator: torch.Generator) -> Iterator[torch.Tensor]:
    while True:
        yield torch.randint(0, n, (batch,), device=device, generator=generator)


def train_vae(
    vae: Any, images: torch.Tensor, cfg: TrainConfig, seconds: float | None, device: torch.device
) -> list[tuple[int, float]]:
    """Train the VAE on uint8 images (N, H, W, 3) already on `device`; returns the loss curve."""
    vae.to(device).train()
    gen = torch.Generator(device).manual_seed(cfg.seed + 1)
    idx_iter = _batches(len(images), cfg.vae_batch, device, gen)

    def loss_fn(step: int) -> torch.Tensor:
        x = images[next(idx_iter)].permute(0, 3, 1, 2).float() / 127.5 - 1.0
        with _autocast(device):
            post = vae.encode(x).latent_dist
            recon = vae.decode(post.sample(generator=gen)).sample
        rec = F.mse_loss(recon.float(), x)
        kl = post.kl().mean() / post.mean[0].numel()  # per latent element, like the MSE
        return rec + cfg.vae_kl * kl

    params = [p for p in vae.parameters() if p.requires_grad]
    curve, _ = _loop(
        "vae",
        params,
        loss_fn,
        cfg.vae_steps,
        seconds,
        cfg.vae_lr,
        min(100, cfg.vae_steps // 10 + 1),
        cfg.log_every,
        None,
    )
    vae.eval().requires_grad_(False)
    return curve


@torch.no_grad()
def encode_latents(vae: Any, images: torch.Tensor, chunk: int = 512) -> torch.Tensor:
    """Posterior means of uint8 images (N, H, W, 3), in float32."""
    out = []
    for i in range(0, len(images), chunk):
        x = images[i : i + chunk].permute(0, 3, 1, 2).float() / 127.5 - 1.0
        out.append(vae.encode(x).latent_dist.mean.float())
    return torch.cat(out)


@torch.no_grad()
def reconstruction_psnr(vae: Any, images: torch.Tensor) -> float:
    """PSNR (dB, 0..255 images) of VAE reconstructions through the posterior mean."""
    x = images.permute(0, 3, 1, 2).float() / 127.5 - 1.0
    recon = vae.decode(vae.encode(x).latent_dist.mean).sample.clamp(-1, 1)
    mse = F.mse_loss(recon, x).item() / 4.0  # [-1,1] -> [0,1]
    return 10 * math.log10(1.0 / max(mse, 1e-12))


def flow_noisy(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """Rectified-flow interpolation at noise level sigma (per sample): what FlowMatchEuler integrates."""
    s = sigma.view(-1, *([1] * (x0.dim() - 1)))
    return (1 - s) * x0 + s * noise


def flow_target(x0: torch.Tensor, noise: torch.Tensor) -> torch.Tensor:
    """The velocity d x_sigma / d sigma, the transformer's training target."""
    return noise - x0


def ddpm_noisy(x0: torch.Tensor, noise: torch.Tensor, alpha_bar: torch.Tensor) -> torch.Tensor:
    """DDPM forward process at cumulative alpha `alpha_bar` (per sample); the target is `noise`."""
    a = alpha_bar.view(-1, *([1] * (x0.dim() - 1)))
    return a.sqrt() * x0 + (1 - a).sqrt() * noise


def _sample_sigmas(n: int, shift: float, device: torch.device, gen: torch.Generator) -> torch.Tensor:
    # Logit-normal (SD3) for the middle of the schedule, mixed with uniform so sigma near 1 (the first
    # step of every sampler) and near 0 (the last) are trained too; then the scheduler's shift.
    u = torch.sigmoid(torch.randn(n, device=device, generator=gen))
    uniform = torch.rand(n, device=device, generator=gen)
    u = torch.where(torch.rand(n, device=device, generator=gen) < 0.3, uniform, u)
    return shift * u / (1 + (shift - 1) * u)


def _sample_seq_len(cfg: TrainConfig, gen: torch.Generator) -> int:
    # Half at the shortest useful length (cheap, and what fast CPU runs use), a quarter at the
    # pipeline's default 512, a quarter in between, so any max_sequence_length in range behaves.
    hi = max(MIN_SEQUENCE_LENGTH, cfg.max_seq_len)
    r = float(torch.rand(1, generator=gen))
    if r < 0.5:
        return MIN_SEQUENCE_LENGTH
    if r < 0.75:
        return hi
    steps = (hi - MIN_SEQUENCE_LENGTH) // 32
    return MIN_SEQUENCE_LENGTH + 32 * int(torch.randint(0, steps + 1, (1,), generator=gen))


def train_flux(
    pipe: Any,
    latents: torch.Tensor,
    clip_ids: torch.Tensor,
    t5_ids: torch.Tensor,
    rows: torch.Tensor,
    cfg: TrainConfig,
    seconds: float | None,
    device: torch.device,
) -> list[tuple[int, float]]:
    """Train flux-mini's transformer and text encoders on normalised latents (N, C, h, w); sample i's
    captions are `clip_ids[rows[i]]` / `t5_ids[rows[i]]` (one per template, see tokenize_captions)."""
    from diffusers import FluxPipeline

    modules = [pipe.transformer, pipe.text_encoder, pipe.text_encoder_2]
    for m in modules:
        m.to(device).train()
    n, c, h, w = latents.shape
    gen = torch.Generator(device).manual_seed(cfg.seed + 2)
    cpu_gen = torch.Generator().manual_seed(cfg.seed + 3)
    idx_iter = _batches(n, cfg.batch, device, gen)
    img_ids = FluxPipeline._prepare_latent_image_ids(cfg.batch, h // 2, w // 2, device, torch.float32)
    empty_clip, empty_t5 = (t.to(device) for t in tokenize(pipe, [""], MIN_SEQUENCE_LENGTH))
    pad_id = pipe.tokenizer_2.pad_token_id
    shift = float(pipe.scheduler.config.shift)

    def loss_fn(step: int) -> torch.Tensor:
        idx = next(idx_iter)
        b = len(idx)
        x0 = FluxPipeline._pack_latents(latents[idx], b, c, h, w)
        tmpl = torch.randint(0, clip_ids.shape[1], (b,), device=device, generator=gen)
        cids, tids = clip_ids[rows[idx], tmpl], t5_ids[rows[idx], tmpl]
        drop = torch.rand(b, device=device, generator=gen) < CAPTION_DROPOUT
        cids = torch.where(drop[:, None], empty_clip, cids)
        tids = torch.where(drop[:, None], empty_t5, tids)
        length = _sample_seq_len(cfg, cpu_gen)
        tids = F.pad(tids, (0, length - tids.shape[1]), value=pad_id)
        sigma = _sample_sigmas(b, shift, device, gen)
        noise = torch.randn(x0.shape, device=device, generator=gen)
        xt = flow_noisy(x0, noise, sigma)
        with _autocast(device):
            seq, pooled = encode_text(pipe, cids, tids)
            v = pipe.transformer(
                hidden_states=xt,
                encoder_hidden_states=seq,
                pooled_projections=pooled,
                timestep=sigma,
                img_ids=img_ids,
                txt_ids=torch.zeros(length, 3, device=device),
                return_dict=False,
            )[0]
        return F.mse_loss(v.float(), flow_target(x0, noise))

    params = [p for m in modules for p in m.parameters()]
    curve, ema = _loop(
        "flux",
        params,
        loss_fn,
        cfg.steps,
        seconds,
        cfg.lr,
        min(cfg.warmup, cfg.steps // 10 + 1),
        cfg.log_every,
        cfg.ema,
    )
    if ema:
        ema.copy_to()
    for m in modules:
        m.eval().requires_grad_(False)
    return curve


def train_dit(
    pipe: Any,
    latents: torch.Tensor,
    labels: torch.Tensor,
    cfg: TrainConfig,
    seconds: float | None,
    device: torch.device,
) -> list[tuple[int, float]]:
    """Train dit-mini's transformer on scaled latents (N, C, h, w) and class ids (N,)."""
    tr = pipe.transformer.to(device)
    # eval(): no dropout anywhere, and in particular no per-block label dropout (each block has its own
    # label embedding and would drop independently); the trainer drops labels once per sample instead.
    tr.eval().requires_grad_(True)
    alphas = pipe.scheduler.alphas_cumprod.to(device=device, dtype=torch.float32)
    gen = torch.Generator(device).manual_seed(cfg.seed + 4)
    idx_iter = _batches(len(latents), cfg.dit_batch, device, gen)

    def loss_fn(step: int) -> torch.Tensor:
        idx = next(idx_iter)
        x0, y = latents[idx], labels[idx]
        y = torch.where(torch.rand(len(y), device=device, generator=gen) < LABEL_DROPOUT, NULL_CLASS, y)
        t = torch.randint(0, len(alphas), (len(idx),), device=device, generator=gen)
        noise = torch.randn(x0.shape, device=device, generator=gen)
        xt = ddpm_noisy(x0, noise, alphas[t])
        with _autocast(device):
            eps = tr(xt, timestep=t, class_labels=y).sample
        return F.mse_loss(eps.float(), noise)

    params = list(tr.parameters())
    curve, ema = _loop(
        "dit",
        params,
        loss_fn,
        cfg.steps,
        seconds,
        cfg.lr,
        min(cfg.warmup, cfg.steps // 10 + 1),
        cfg.log_every,
        cfg.ema,
    )
    if ema:
        ema.copy_to()
    tr.requires_grad_(False)
    # Label rows the domain never uses are never trained: zero them so they are inert (and compress).
    with torch.no_grad():
        for mod in tr.modules():
            if type(mod).__name__ == "LabelEmbedding":
                mod.embedding_table.weight[domain.NUM_CLASSES : NULL_CLASS] = 0.0
    return curve


# ------------------------------------------------------------------------------------ evaluation


def generate_flux(
    pipe: Any, prompts: Sequence[str], steps: int = 28, seed: int = 0, **kwargs: Any
) -> np.ndarray:
    """Images (N, H, W, 3) float in [0,1] from the standard FluxPipeline call, one seed per prompt."""
    device = pipe._execution_device
    gens = [torch.Generator(device).manual_seed(seed + i) for i in range(len(prompts))]
    out = pipe(
        prompt=list(prompts),
        num_inference_steps=steps,
        height=IMAGE_SIZE,
        width=IMAGE_SIZE,
        generator=gens,
        output_type="np",
        **kwargs,
    )
    return np.asarray(out.images)


def generate_dit(
    pipe: Any, class_labels: Sequence[int], steps: int = 25, seed: int = 0, guidance_scale: float = 4.0
) -> np.ndarray:
    """Images (N, H, W, 3) float in [0,1] from the standard DiTPipeline call."""
    device = pipe._execution_device
    gens = [torch.Generator(device).manual_seed(seed + i) for i in range(len(class_labels))]
    out = pipe(
        class_labels=list(class_labels),
        num_inference_steps=steps,
        guidance_scale=guidance_scale,
        generator=gens,
        output_type="np",
    )
    return np.asarray(out.images)


def save_grid(rows: Sequence[np.ndarray], path: Path, scale: int = 2) -> None:
    """Save rows of images (each (N, H, W, 3), uint8 or float in [0,1]) as one PNG."""
    from PIL import Image

    def u8(a: np.ndarray) -> np.ndarray:
        return a if a.dtype == np.uint8 else (np.clip(a, 0, 1) * 255).round().astype(np.uint8)

    grid = np.concatenate([np.concatenate(list(u8(r)), axis=1) for r in rows], axis=0)
    img = Image.fromarray(grid)
    img.resize((img.width * scale, img.height * scale), Image.Resampling.NEAREST).save(path)


# ------------------------------------------------------------------------------------------ main


def _load_vae(path: str) -> Any:
    """A trained VAE from a pipeline directory (its vae/) or a model directory."""
    from diffusers import AutoencoderKL

    sub = Path(path) / "vae"
    vae = AutoencoderKL.from_pretrained(sub if sub.is_dir() else path, local_files_only=True)
    return vae.eval().requires_grad_(False)


def _stage_seconds(cfg: TrainConfig, stage: str) -> float | None:
    """This stage's share of the wall-clock budget (None: no budget)."""
    if not cfg.minutes:
        return None
    active = ([] if cfg.vae else ["vae"]) + (["flux", "dit"] if cfg.which == "both" else [cfg.which])
    total = sum(cfg.budget_split[k] for k in active)
    return 60.0 * cfg.minutes * cfg.budget_split[stage] / total


def run(cfg: TrainConfig) -> dict[str, Any]:
    """Train (per `cfg.which`), save, reload, evaluate. Returns a summary (also written as JSON)."""
    device = torch.device(cfg.device)
    torch.manual_seed(cfg.seed)
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        torch.backends.cudnn.allow_tf32 = True
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    gpu = torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu"
    print(f"torch {torch.__version__} on {gpu}; config {asdict(cfg)}", flush=True)
    t_start = time.perf_counter()
    summary: dict[str, Any] = {"config": asdict(cfg)}

    print(f"rendering {cfg.dataset_size} scenes ...", flush=True)
    scenes, images_np = render_dataset(cfg.dataset_size, cfg.seed, cfg.workers)
    images = torch.from_numpy(images_np).to(device)
    print(f"  {time.perf_counter() - t_start:.0f}s", flush=True)

    if cfg.vae:
        vae = _load_vae(cfg.vae).to(device)
        print(f"VAE: reusing {cfg.vae}", flush=True)
    else:
        vae = build_vae(cfg.seed)
        print(f"VAE: {param_count(vae):,} params", flush=True)
        summary["vae_curve"] = train_vae(vae, images, cfg, _stage_seconds(cfg, "vae"), device)
    held_out = torch.from_numpy(
        np.stack([domain.render(s) for s in domain.sample_scenes(256, cfg.seed + 99)])
    )
    summary["vae_psnr"] = reconstruction_psnr(vae, held_out.to(device))
    print(f"VAE reconstruction PSNR on held-out scenes: {summary['vae_psnr']:.1f} dB", flush=True)
    raw = encode_latents(vae, images)
    mean, std = float(raw.mean()), float(raw.std())
    rms = math.sqrt(mean * mean + std * std)
    summary["latent_stats"] = {"mean": mean, "std": std}
    print(f"latents: mean {mean:.3f} std {std:.3f}", flush=True)

    results: dict[str, Any] = {}
    if cfg.which in ("flux", "both"):
        flux: Any = build_flux_mini(vae=copy.deepcopy(vae).cpu(), seed=cfg.seed)
        # FluxPipeline decodes latents / scaling_factor + shift_factor: make the model space unit-variance.
        flux.vae.register_to_config(shift_factor=mean, scaling_factor=1.0 / std)
        sizes = {k: param_count(getattr(flux, k)) for k in ("transformer", "text_encoder", "text_encoder_2")}
        print(f"flux-mini: {sizes}", flush=True)
        clip_ids, t5_ids, rows = tokenize_captions(flux, scenes)
        curve = train_flux(
            flux,
            (raw - mean) / std,
            clip_ids.to(device),
            t5_ids.to(device),
            rows.to(device),
            cfg,
            _stage_seconds(cfg, "flux"),
            device,
        )
        results["flux-mini"] = _save_and_eval("flux-mini", flux, out, cfg, device, curve)
    if cfg.which in ("dit", "both"):
        dit: Any = build_dit_mini(vae=copy.deepcopy(vae).cpu(), seed=cfg.seed)
        # DiTPipeline decodes latents / scaling_factor (no shift): unit RMS.
        dit.vae.register_to_config(shift_factor=0.0, scaling_factor=1.0 / rms)
        print(f"dit-mini: transformer {param_count(dit.transformer):,} params", flush=True)
        labels = torch.tensor([domain.class_label(s) for s in scenes], device=device)
        curve = train_dit(dit, raw / rms, labels, cfg, _stage_seconds(cfg, "dit"), device)
        results["dit-mini"] = _save_and_eval("dit-mini", dit, out, cfg, device, curve)
    summary["models"] = results
    summary["seconds"] = time.perf_counter() - t_start
    print(f"total {summary['seconds']:.0f}s", flush=True)
    return summary


def _dir_size(path: Path) -> int:
    return sum(f.stat().st_size for f in path.rglob("*") if f.is_file())


def _save_and_eval(
    name: str, pipe: Any, out: Path, cfg: TrainConfig, device: torch.device, curve: list[tuple[int, float]]
) -> dict[str, Any]:
    target = out / name
    pipe.to("cpu")
    pipe.save_pretrained(target, safe_serialization=True)
    info: dict[str, Any] = {
        "checkpoint_bytes": _dir_size(target),
        "loss_curve": curve,
        "config": {k: v for k, v in asdict(cfg).items() if k != "out"},
    }
    print(f"[{name}] saved {target} ({info['checkpoint_bytes'] / 2**20:.1f} MiB)", flush=True)
    try:  # a failing evaluation must not cost the checkpoint, nor the training of the next model
        info |= _evaluate(name, target, out, cfg, device)
    except Exception as exc:  # reported, and the run goes on
        import traceback

        traceback.print_exc()
        info["eval_error"] = f"{type(exc).__name__}: {exc}"
    (target / "fluxtune_training.json").write_text(json.dumps(info, indent=1))
    return info


def _evaluate(name: str, target: Path, out: Path, cfg: TrainConfig, device: torch.device) -> dict[str, Any]:
    """Reload a saved pipeline the way users load it, draw the evaluation set, score adherence."""
    from diffusers import DiffusionPipeline

    loaded = DiffusionPipeline.from_pretrained(target, local_files_only=True, dtype=torch.float32).to(device)
    loaded.set_progress_bar_config(disable=True)
    rows: list[np.ndarray] = [np.stack([domain.render(s) for s in domain.EVAL_SCENES])]
    result: dict[str, Any] = {"eval_steps": cfg.eval_steps}
    if name == "flux-mini":
        targets: list[Any] = list(domain.EVAL_PROMPTS)
        lengths = sorted({cfg.max_seq_len, MIN_SEQUENCE_LENGTH}, reverse=True)
    else:
        targets = [domain.scene_of_class(c) for c in domain.EVAL_CLASSES]
        lengths = [0]
    for length in lengths:
        scores = []
        for k in range(cfg.eval_seeds):
            if name == "flux-mini":
                imgs = generate_flux(
                    loaded,
                    domain.EVAL_PROMPTS,
                    steps=cfg.eval_steps,
                    seed=1000 * k,
                    max_sequence_length=length,
                )
            else:
                imgs = generate_dit(loaded, domain.EVAL_CLASSES, steps=cfg.eval_steps, seed=1000 * k)
            scores.append(mean_adherence(list(imgs), targets))
            if length == lengths[0]:
                rows.append(imgs)
        total = float(np.mean([s.total for s in scores]))
        aspects = {
            a: float(np.mean([getattr(s, a) for s in scores]))
            for a in ("background", "color", "position", "size", "shape")
            if scores[0].as_dict()[a] is not None
        }
        key = f"adherence_seq{length}" if name == "flux-mini" else "adherence"
        result[key] = total
        result[key + "_aspects"] = aspects
        where = f" (max_sequence_length={length})" if name == "flux-mini" else ""
        print(
            f"[{name}] mean adherence on the evaluation set{where}, {cfg.eval_steps} steps: {total:.3f} "
            f"{ {a: round(v, 3) for a, v in aspects.items()} }",
            flush=True,
        )
    grid = out / f"{name}-samples.png"
    save_grid(rows, grid)
    print(f"[{name}] samples (top row: ground truth): {grid}", flush=True)
    return result


def parse_args(argv: Sequence[str] | None = None) -> TrainConfig:
    """Command line -> TrainConfig (defaults depend on the device: GPU runs are long, CPU runs short)."""
    p = argparse.ArgumentParser(
        prog="train_minimodels.py",
        description="Train flux-mini and dit-mini (the built-in mini models) on the procedural "
        "shapes domain.",
    )
    p.add_argument(
        "--out", required=True, help="output dir (fluxtune/minimodels/checkpoints to update the built-ins)"
    )
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--which", choices=("flux", "dit", "both"), default="both")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--steps", type=int, help="optimizer steps of each diffusion model (GPU 20000, CPU 300)")
    p.add_argument("--batch", type=int, help="flux-mini batch (GPU 256, CPU 16)")
    p.add_argument(
        "--dit-batch", type=int, help="dit-mini batch (GPU 512, CPU 32): 64 tokens a sample, so cheap"
    )
    p.add_argument("--vae-steps", type=int, help="VAE optimizer steps (GPU 4000, CPU 300)")
    p.add_argument("--vae-batch", type=int, help="VAE batch (GPU 128, CPU 16)")
    p.add_argument("--dataset-size", type=int, help="rendered training scenes (GPU 60000, CPU 4000)")
    p.add_argument("--lr", type=float, default=6e-4)
    p.add_argument(
        "--vae", help="reuse the trained VAE of this pipeline (or VAE) directory instead of training one"
    )
    p.add_argument(
        "--minutes",
        type=float,
        help="wall-clock budget for training, split VAE 12%% / flux 60%% / dit 28%% (over the stages that "
        "run); each stage stops at its steps or its share, whichever comes first (GPU default 7, CPU: none)",
    )
    p.add_argument(
        "--max-seq-len",
        type=int,
        default=MAX_SEQUENCE_LENGTH,
        help=f"longest T5 padding trained ({MIN_SEQUENCE_LENGTH}..512; lower only for quick CPU runs)",
    )
    p.add_argument("--eval-steps", type=int, default=28)
    p.add_argument("--eval-seeds", type=int, default=2)
    p.add_argument("--log-every", type=int)
    p.add_argument(
        "--workers", type=int, default=min(16, os.cpu_count() or 1), help="processes rendering scenes"
    )
    a = p.parse_args(argv)
    gpu = a.device.startswith("cuda")

    def pick(value: Any, on_gpu: Any, on_cpu: Any) -> Any:
        return value if value is not None else (on_gpu if gpu else on_cpu)

    if not MIN_SEQUENCE_LENGTH <= a.max_seq_len <= MAX_SEQUENCE_LENGTH:
        p.error(f"--max-seq-len {a.max_seq_len} is outside {MIN_SEQUENCE_LENGTH}..{MAX_SEQUENCE_LENGTH}")
    return TrainConfig(
        out=a.out,
        device=a.device,
        which=a.which,
        seed=a.seed,
        dataset_size=pick(a.dataset_size, 60_000, 4_000),
        vae_steps=pick(a.vae_steps, 4_000, 300),
        vae_batch=pick(a.vae_batch, 128, 16),
        steps=pick(a.steps, 20_000, 300),
        batch=pick(a.batch, 256, 16),
        dit_batch=pick(a.dit_batch, 512, 32),
        lr=a.lr,
        minutes=pick(a.minutes, 7.0, None),
        max_seq_len=a.max_seq_len,
        eval_steps=a.eval_steps,
        eval_seeds=a.eval_seeds,
        log_every=pick(a.log_every, 250, 25),
        workers=a.workers,
        vae=a.vae,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of scripts/train_minimodels.py."""
    cfg = parse_args(argv)
    summary = run(cfg)
    Path(cfg.out, "training_summary.json").write_text(json.dumps(summary, indent=1, default=str))
    return 0
