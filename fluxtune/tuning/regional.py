"""tiling: regional denoising (MultiDiffusion) of FLUX.1's packed latent.

Each denoising step the transformer runs on overlapping square tiles of the latent instead of the whole
image: every tile gets its own token positions (``img_ids``, so RoPE places it where it lies in the
picture), the prompt's conditioning is shared, and the tiles' predictions are blended with weights that
ramp linearly across the overlap (MultiDiffusion, Bar-Tal et al. 2023, with feathered instead of uniform
weights). The tiles run one after another, so the transformer's activations follow the tile, not the
image; the tiles all have one shape (the last row and column of tiles are aligned to the image's edge
instead of being cut), so a compiled transformer does not recompile per tile.

The hook replaces the transformer's ``forward`` through diffusers' ``HookRegistry``; hooks on its blocks
(partial residency's streaming) run once per tile, so a streamed transformer copies its streamed blocks
once per tile and step.
"""

from __future__ import annotations

import functools
import math
from typing import Any

from fluxtune.tuning.base import CACHE, Context, Handler, register

HOOK = "fluxtune_regional"
TOKEN_PX = 16
"""Pixels per side of one FLUX.1 latent token (the VAE's 8x, then 2x2 packing); a pipeline with another
VAE (flux-mini's is 4x) has ``2 * vae_scale_factor``."""


def token_px(pipe: Any) -> int:
    """Pixels per side of one packed latent token of this FLUX pipeline."""
    return 2 * int(getattr(pipe, "vae_scale_factor", TOKEN_PX // 2))


def tile_starts(size: int, tile: int, overlap: int) -> list[int]:
    """Start offsets of the fewest equal tiles covering ``size`` (tokens) with neighbours sharing at least
    ``overlap``, spread evenly (the first at 0, the last ending at the edge)."""
    if size <= tile:
        return [0]
    n = math.ceil((size - overlap) / (tile - overlap))
    return [round(i * (size - tile) / (n - 1)) for i in range(n)]


def seam_lines(size_px: int, tile_px: int, overlap_px: int, token: int = TOKEN_PX) -> list[int]:
    """Pixel lines where one tile's weight starts or stops ramping: where a seam would show."""
    tile, overlap = tile_px // token, overlap_px // token
    starts = tile_starts(size_px // token, tile, overlap)
    lines = {s * token for s in starts[1:]} | {(s + tile) * token for s in starts[:-1]}
    return sorted(lines)


def ramp(tile: int, overlap: int, first: bool, last: bool) -> Any:
    """Blending weights along one side of a tile: 1 inside, ramping down across the overlap on the sides
    that have a neighbour (never to 0, so a token covered once keeps its value)."""
    import torch

    w = torch.ones(tile)
    if overlap > 0:
        up = (torch.arange(overlap, dtype=torch.float32) + 1) / (overlap + 1)
        if not first:
            w[:overlap] = up
        if not last:
            w[tile - overlap:] = up.flip(0)
    return w


class RegionalForward:
    """Runs the wrapped FLUX transformer tile by tile and blends the predictions (the body of the
    diffusers ``ModelHook`` that :func:`make_hook` builds: diffusers is imported only when one is used)."""

    fn_ref: Any

    def __init__(self, tile_tokens: int, overlap_tokens: int) -> None:
        super().__init__()
        self.tile, self.overlap = tile_tokens, overlap_tokens
        self.calls = 0  # tile forwards run (for tests and the report)
        self._plans: dict[tuple[int, int, str], tuple[list[tuple[Any, Any]], Any]] = {}

    def _plan(self, rows: int, cols: int, device: Any) -> tuple[list[tuple[Any, Any]], Any]:
        """The tiles of a ``rows`` x ``cols`` token latent (their token indices and blend weights) and the
        weights' sum per token; the same for every step of a call, so made once per latent shape."""
        import torch

        key = (rows, cols, str(device))
        if key not in self._plans:
            grid = torch.arange(rows * cols, device=device).view(rows, cols)
            th, tw = min(self.tile, rows), min(self.tile, cols)
            ys, xs = tile_starts(rows, th, self.overlap), tile_starts(cols, tw, self.overlap)
            tiles, weight_sum = [], torch.zeros(rows * cols, device=device, dtype=torch.float32)
            for i, y in enumerate(ys):
                wy = ramp(th, self.overlap, i == 0, i == len(ys) - 1)
                for j, x in enumerate(xs):
                    wx = ramp(tw, self.overlap, j == 0, j == len(xs) - 1)
                    idx = grid[y:y + th, x:x + tw].reshape(-1)
                    w = (wy[:, None] * wx[None, :]).reshape(-1).to(device)
                    tiles.append((idx, w))
                    weight_sum[idx] += w
            self._plans[key] = (tiles, weight_sum)
        return self._plans[key]

    def new_forward(self, module: Any, hidden_states: Any = None, *args: Any, **kwargs: Any) -> Any:
        import torch

        forward = self.fn_ref.original_forward
        img_ids = kwargs.get("img_ids")
        if args or img_ids is None or hidden_states is None or img_ids.ndim != 2 or any(
                kwargs.get(k) is not None for k in ("controlnet_block_samples", "controlnet_single_block_samples")):
            return forward(hidden_states, *args, **kwargs)
        rows, cols = (int(v) + 1 for v in img_ids[:, 1:3].amax(0).tolist())  # one sync per step
        if rows * cols != hidden_states.shape[1] or (rows <= self.tile and cols <= self.tile):
            return forward(hidden_states, *args, **kwargs)  # not a plain image latent, or one tile covers it
        return_dict = kwargs.pop("return_dict", True)
        tiles, weight_sum = self._plan(rows, cols, hidden_states.device)
        out_sum: Any = None
        for idx, w in tiles:
            pred = forward(hidden_states[:, idx], *args, **{**kwargs, "img_ids": img_ids[idx], "return_dict": False})[0]
            self.calls += 1
            if out_sum is None:
                out_sum = torch.zeros(hidden_states.shape[0], rows * cols, pred.shape[-1], device=pred.device,
                                      dtype=torch.float32)
            out_sum[:, idx] += pred.float() * w[None, :, None]
        out = (out_sum / weight_sum[None, :, None]).to(hidden_states.dtype)
        if not return_dict:
            return (out,)
        from diffusers.models.modeling_outputs import Transformer2DModelOutput

        return Transformer2DModelOutput(sample=out)


@functools.cache
def _hook_class() -> type:
    from diffusers.hooks import ModelHook

    return type("RegionalHook", (RegionalForward, ModelHook), {})


def make_hook(tile_tokens: int, overlap_tokens: int) -> Any:
    """A diffusers ``ModelHook`` running :class:`RegionalForward` (its ``new_forward`` replaces forward)."""
    return _hook_class()(tile_tokens, overlap_tokens)


@register
class RegionalHandler(Handler):
    name = "tiling"
    phase = CACHE  # a forward hook: on before placement's and compile's

    def check(self, ctx: Context) -> list[str]:
        t = ctx.profile.tiling
        if t.mode == "none":
            return []
        if ctx.family != "flux":
            return [f"tiling.mode=regional: regional denoising is built for FLUX.1's packed latent; this is a "
                    f"{ctx.family} pipeline; set tiling.mode=none"]
        if ctx.profile.cache.kind != "none":
            return [f"tiling.mode=regional with cache.kind={ctx.profile.cache.kind}: the cache would compare one "
                    "tile's residual with another's; set cache.kind=none"]
        return []

    def apply(self, ctx: Context) -> None:
        from diffusers.hooks import HookRegistry

        t = ctx.profile.tiling
        if t.mode == "none":
            return
        module = ctx.components()["transformer"]
        px = token_px(ctx.pipe)
        hook = make_hook(max(1, t.tile // px), t.overlap // px)
        registry = HookRegistry.check_if_exists_or_initialize(module)
        registry.register_hook(hook, HOOK)
        ctx.undo.append((self.name, lambda: registry.remove_hook(HOOK, recurse=False)))
        ctx.report.add(self.name, "transformer", f"regional denoising: {t.tile}px tiles overlapping by {t.overlap}px "
                       f"({t.tile // px} and {t.overlap // px} latent tokens), blended with feathered weights (images up "
                       "to one tile run whole)")
