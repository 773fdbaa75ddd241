"""Prompt adherence without a downloaded network: read the picture back and compare it to the prompt.

The analysis is deterministic image processing on the mini models' domain (`domain.py`):

1. background colour = per-channel median of a thin border band;
2. foreground = pixels closer to the shape colour than to the background (a two-means split seeded by
   the pixels far from the background), minus specks smaller than a tenth of the largest blob;
3. shape colour = median of the foreground; position = its centroid; shape = the template (rendered
   at that centroid with the same area) with the best IoU; size = the extent implied by the area and
   that template's fill ratio.

Each aspect score is the probability a soft classifier gives the value the prompt asks for
(a Gaussian kernel over the candidate values, normalised), so it is near 1 when the picture clearly
shows what was asked, near 0 when it clearly shows something else, and moves continuously in between:
small degradations of a picture give small, measurable drops.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, fields
from typing import Any

import numpy as np

from fluxtune.minimodels.domain import (
    COLORS,
    EXTENTS,
    FILL_RATIOS,
    PALETTE,
    POSITIONS,
    SHAPES,
    SIZES,
    Scene,
    parse_prompt,
    position_center,
    shape_coverage,
)

# Kernel widths of the soft classifiers. Chosen so that the canonical renders score ~1 and a value
# half-way between two candidates scores ~0.5 (see the tests).
COLOR_SIGMA = 25.0  # RGB units (0..255); palette colours are >= ~100 apart
POSITION_SIGMA = 0.06  # fraction of the image side; cell centres are 0.25 apart
SIZE_SIGMA = 0.12  # in log(extent); small and large are log(0.34/0.19) = 0.58 apart
SHAPE_TAU = 0.03  # IoU units; the right template has IoU ~1, the nearest wrong one ~0.8
MIN_FOREGROUND_DISTANCE = 50.0  # RGB distance from the background that seeds the foreground
MIN_FOREGROUND_PIXELS = 0.002  # fraction of the image; below it there is no shape to score

_PALETTE_RGB = np.asarray([PALETTE[c] for c in COLORS], dtype=np.float32)


@dataclass(frozen=True)
class AdherenceScore:
    """Per-aspect adherence in [0, 1]; None where the prompt does not specify that aspect."""

    background: float | None
    color: float | None
    position: float | None
    size: float | None
    shape: float | None
    total: float

    def as_dict(self) -> dict[str, float | None]:
        """The scores as a plain dict (for reports)."""
        return {f.name: getattr(self, f.name) for f in fields(self)}


@dataclass(frozen=True)
class Analysis:
    """What the analysis read from a picture: soft distributions over each aspect's values."""

    background: dict[str, float]
    color: dict[str, float]
    position: dict[str, float]
    size: dict[str, float]
    shape: dict[str, float]
    found_shape: bool

    def best(self) -> Scene | None:
        """The most likely scene, or None when no shape was found."""
        if not self.found_shape:
            return None
        color = max(self.color, key=self.color.__getitem__)
        background = max(self.background, key=self.background.__getitem__)
        if color == background:  # nearly invisible shape: take the second best shape colour
            color = sorted(self.color, key=self.color.__getitem__)[-2]
        return Scene(
            shape=max(self.shape, key=self.shape.__getitem__),
            color=color,
            background=background,
            position=max(self.position, key=self.position.__getitem__),
            size=max(self.size, key=self.size.__getitem__),
        )


def to_uint8_rgb(image: Any) -> np.ndarray:
    """Convert a PIL image, a numpy HxWx3 array (uint8, or float in [0,1]) or a torch tensor (CHW or
    HWC, float in [0,1]) to a float32 HxWx3 array in 0..255.

    Raises:
        ValueError: the array does not look like one RGB image.
    """
    if type(image).__module__.startswith("torch"):
        image = image.detach().float().cpu().numpy()
        if image.ndim == 4 and image.shape[0] == 1:
            image = image[0]
        if image.ndim == 3 and image.shape[0] in (1, 3) and image.shape[-1] not in (1, 3):
            image = image.transpose(1, 2, 0)
    arr = np.asarray(image)
    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=-1)
    if arr.ndim != 3 or arr.shape[-1] not in (3, 4):
        raise ValueError(f"expected one RGB image (HxWx3), got an array of shape {arr.shape}")
    arr = arr[..., :3]
    if arr.dtype == np.uint8:
        return arr.astype(np.float32)
    # float images from pipelines are in [0, 1]
    return np.clip(arr.astype(np.float32), 0.0, 1.0) * 255.0


def _soft(distances: np.ndarray, sigma: float, names: Sequence[str]) -> dict[str, float]:
    logits = -0.5 * (distances / sigma) ** 2
    p = np.exp(logits - logits.max())
    p /= p.sum()
    return {n: float(v) for n, v in zip(names, p, strict=True)}


def _color_probs(rgb: np.ndarray) -> dict[str, float]:
    return _soft(np.linalg.norm(_PALETTE_RGB - rgb, axis=1), COLOR_SIGMA, COLORS)


def _components(mask: np.ndarray) -> list[np.ndarray]:
    """4-connected components of a boolean mask, as index arrays (BFS: images here are tiny)."""
    h, w = mask.shape
    label = np.full(mask.shape, -1, dtype=np.int32)
    comps: list[np.ndarray] = []
    for start in zip(*np.nonzero(mask), strict=True):
        if label[start] >= 0:
            continue
        idx = len(comps)
        label[start] = idx
        queue, members = deque([start]), [start]
        while queue:
            y, x = queue.popleft()
            for ny, nx in ((y - 1, x), (y + 1, x), (y, x - 1), (y, x + 1)):
                if 0 <= ny < h and 0 <= nx < w and mask[ny, nx] and label[ny, nx] < 0:
                    label[ny, nx] = idx
                    queue.append((ny, nx))
                    members.append((ny, nx))
        comps.append(np.asarray(members))
    return comps


def _box3(img: np.ndarray) -> np.ndarray:
    """3x3 mean filter (edges replicated)."""
    pad = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    h, w = img.shape[:2]
    out = np.zeros(img.shape, dtype=np.float32)
    for dy in range(3):
        for dx in range(3):
            out += pad[dy : dy + h, dx : dx + w]
    return out / 9.0


def _dilate(mask: np.ndarray) -> np.ndarray:
    """3x3 binary dilation."""
    out = mask.copy()
    out[1:] |= mask[:-1]
    out[:-1] |= mask[1:]
    out2 = out.copy()
    out2[:, 1:] |= out[:, :-1]
    out2[:, :-1] |= out[:, 1:]
    return out2


def analyse(image: Any) -> Analysis:
    """Read background, shape colour, position, size and shape from a picture (see the module doc)."""
    img = to_uint8_rgb(image)
    h, w, _ = img.shape
    band = max(1, min(h, w) // 32)
    border = np.concatenate(
        [
            img[:band].reshape(-1, 3),
            img[-band:].reshape(-1, 3),
            img[:, :band].reshape(-1, 3),
            img[:, -band:].reshape(-1, 3),
        ]
    )
    bg = np.median(border, axis=0)
    background = _color_probs(bg)
    uniform = {n: 1.0 / len(COLORS) for n in COLORS}
    nothing = Analysis(
        background=background,
        color=uniform,
        position={p: 1.0 / len(POSITIONS) for p in POSITIONS},
        size={s: 1.0 / len(SIZES) for s in SIZES},
        shape={s: 1.0 / len(SHAPES) for s in SHAPES},
        found_shape=False,
    )

    # Segment on a 3x3 box-filtered copy: pixel noise (a few-step sample, say) then cannot seed the
    # foreground, while the soft coverage below still uses the raw pixels.
    smooth = _box3(img)
    dist_bg = np.linalg.norm(smooth - bg, axis=-1)
    seed = dist_bg > MIN_FOREGROUND_DISTANCE
    min_pixels = max(3, int(MIN_FOREGROUND_PIXELS * h * w))
    if seed.sum() < min_pixels:
        return nothing
    fg = np.median(smooth[seed], axis=0)
    # Two-means split: an anti-aliased edge pixel goes to the side it is closer to, so the mask area
    # matches the true shape area.
    mask = np.linalg.norm(smooth - fg, axis=-1) < dist_bg
    comps = _components(mask)
    if not comps:
        return nothing
    biggest = max(len(c) for c in comps)
    keep = [c for c in comps if len(c) >= max(2, biggest // 10)]
    pts = np.concatenate(keep)
    if len(pts) < min_pixels:
        return nothing
    keep = np.zeros_like(mask)
    keep[pts[:, 0], pts[:, 1]] = True
    fg = np.median(img[keep], axis=0)
    color = _color_probs(fg)
    # Soft coverage: where each pixel lies on the background->shape colour line. On anti-aliased
    # renders it is the exact coverage, so area, centroid and template IoU are exact too.
    axis = fg - bg
    alpha = np.clip(((img - bg) @ axis) / max(float(axis @ axis), 1e-6), 0.0, 1.0)
    alpha *= _dilate(keep)  # drop the specks, keep the edge pixels of the kept blobs
    area = float(alpha.sum())
    if area < min_pixels:
        return nothing
    ys, xs = np.mgrid[0:h, 0:w]
    cy = float((alpha * (ys + 0.5)).sum() / area)  # pixel centres are at +0.5
    cx = float((alpha * (xs + 0.5)).sum() / area)
    side = float(min(h, w))
    cells = np.asarray([position_center(p) for p in POSITIONS], dtype=np.float32) * np.asarray([w, h])
    position = _soft(np.hypot(cells[:, 0] - cx, cells[:, 1] - cy) / side, POSITION_SIGMA, POSITIONS)

    ious = []
    for s in SHAPES:
        extent = np.sqrt(area / FILL_RATIOS[s])
        template = shape_coverage(s, cx, cy, extent, size=max(h, w))[:h, :w]
        ious.append(float(np.minimum(template, alpha).sum() / np.maximum(template, alpha).sum()))
    logits = (np.asarray(ious) - max(ious)) / SHAPE_TAU
    p = np.exp(logits) / np.exp(logits).sum()
    shape = {s: float(v) for s, v in zip(SHAPES, p, strict=True)}
    best_shape = SHAPES[int(np.argmax(ious))]

    log_extent = np.log(np.sqrt(area / FILL_RATIOS[best_shape]) / side)
    size = _soft(np.asarray([log_extent - np.log(EXTENTS[s]) for s in SIZES]), SIZE_SIGMA, SIZES)
    return Analysis(
        background=background, color=color, position=position, size=size, shape=shape, found_shape=True
    )


def score(analysis: Analysis, target: Scene) -> AdherenceScore:
    """Score an analysis against what `target` asks for (None fields are not scored)."""
    parts: dict[str, float | None] = {
        "background": analysis.background[target.background] if target.background else None,
        "color": analysis.color[target.color] if target.color else None,
        "position": analysis.position[target.position] if target.position else None,
        "size": analysis.size[target.size] if target.size else None,
        # without a visible shape the shape aspect is simply wrong, not merely uncertain
        "shape": analysis.shape[target.shape] if analysis.found_shape else 0.0,
    }
    if not analysis.found_shape:
        parts = {k: (0.0 if v is not None and k != "background" else v) for k, v in parts.items()}
    given = [v for v in parts.values() if v is not None]
    return AdherenceScore(**parts, total=float(np.mean(given)))


def _target(prompt_or_scene: str | Scene) -> Scene:
    if isinstance(prompt_or_scene, Scene):
        return prompt_or_scene
    scene = parse_prompt(prompt_or_scene)
    if scene is None:
        raise ValueError(
            f"prompt {prompt_or_scene!r} is not in the mini-model grammar: it needs a shape word "
            f"({', '.join(SHAPES)}), e.g. 'a large red circle at the top left on a blue background'"
        )
    return scene


def adherence(image: Any, prompt_or_scene: str | Scene) -> AdherenceScore:
    """How well one picture shows what a prompt (or scene) asks for.

    Args:
        image: PIL image, numpy HxWx3 (uint8 or float in [0,1]) or torch tensor CHW in [0,1].
        prompt_or_scene: a prompt in the caption grammar, or a (possibly partial) Scene.

    Returns:
        Per-aspect scores in [0, 1] and their mean over the aspects the prompt specifies.

    Raises:
        ValueError: the prompt cannot be parsed, or the image is not one RGB picture.
    """
    return score(analyse(image), _target(prompt_or_scene))


def mean_adherence(images: Sequence[Any], prompts: Sequence[str | Scene]) -> AdherenceScore:
    """Per-aspect means of `adherence` over pairs of pictures and prompts.

    Raises:
        ValueError: the sequences differ in length or are empty, or a prompt cannot be parsed.
    """
    if len(images) != len(prompts) or not images:
        raise ValueError(
            f"need as many images as prompts (and at least one), got {len(images)} and {len(prompts)}"
        )
    scores = [adherence(im, p) for im, p in zip(images, prompts, strict=True)]
    out: dict[str, float | None] = {}
    for f in fields(AdherenceScore):
        vals = [getattr(s, f.name) for s in scores if getattr(s, f.name) is not None]
        out[f.name] = float(np.mean(vals)) if vals else None
    total = out.pop("total")
    return AdherenceScore(**out, total=float(total or 0.0))


__all__ = [
    "AdherenceScore",
    "Analysis",
    "adherence",
    "analyse",
    "mean_adherence",
    "score",
    "to_uint8_rgb",
]
