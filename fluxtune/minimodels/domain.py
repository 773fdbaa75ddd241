"""The procedural picture domain the mini models are trained on.

A scene is one coloured shape on a plain coloured background, at one of nine grid positions, in one
of two sizes. This module renders scenes (numpy only, anti-aliased by supersampling), writes
captions from a small grammar with paraphrase templates, parses such captions back, and defines the
class ids of dit-mini. It imports no torch, so the adherence metric and the tests stay cheap.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass

import numpy as np

# Well separated colours: the closest pair (red/orange, blue/purple) is ~100 apart in 0..255 RGB, so
# a colour read back from a generated image is unambiguous unless the model got it genuinely wrong.
PALETTE: dict[str, tuple[int, int, int]] = {
    "red": (215, 35, 35),
    "orange": (245, 130, 20),
    "yellow": (245, 235, 40),
    "green": (30, 165, 55),
    "blue": (35, 70, 215),
    "purple": (135, 50, 190),
    "white": (245, 245, 245),
    "black": (15, 15, 15),
}
COLORS: tuple[str, ...] = tuple(PALETTE)
SHAPES: tuple[str, ...] = ("circle", "square", "triangle", "ring", "cross")
SIZES: tuple[str, ...] = ("small", "large")
ROWS: tuple[str, ...] = ("top", "middle", "bottom")
COLS: tuple[str, ...] = ("left", "center", "right")
POSITIONS: tuple[str, ...] = (
    "top left", "top center", "top right",
    "middle left", "center", "middle right",
    "bottom left", "bottom center", "bottom right",
)  # fmt: skip

# Geometry as fractions of the image side. Cell centres leave room for a large triangle, whose
# centroid (not its bounding box) sits on the cell centre, to stay inside the picture.
CELL_CENTERS: tuple[float, ...] = (0.25, 0.5, 0.75)
EXTENTS: dict[str, float] = {"small": 0.19, "large": 0.34}
# Area of each shape divided by extent**2 (the extent is the side of the shape's bounding box).
FILL_RATIOS: dict[str, float] = {
    "circle": np.pi / 4,
    "square": 1.0,
    "triangle": 0.5,
    "ring": 0.75 * np.pi / 4,
    "cross": 5.0 / 9.0,
}
# Jitter of training renders (uniform, +-): small enough that a jittered scene is still read back
# as its own position and size.
POSITION_JITTER = 0.03
EXTENT_JITTER = 0.05


@dataclass(frozen=True)
class Scene:
    """One scene, or (with some fields None) what a prompt asks for.

    A field that is None is unspecified: `render` needs every field, `adherence` scores only the
    specified ones.
    """

    shape: str
    color: str | None = None
    background: str | None = None
    position: str | None = None
    size: str | None = None

    def __post_init__(self) -> None:
        for field, value, allowed in (
            ("shape", self.shape, SHAPES),
            ("color", self.color, COLORS),
            ("background", self.background, COLORS),
            ("position", self.position, POSITIONS),
            ("size", self.size, SIZES),
        ):
            if value is not None and value not in allowed:
                raise ValueError(f"Scene.{field}={value!r} is not one of {', '.join(allowed)}")
        if self.color is not None and self.color == self.background:
            raise ValueError(
                f"Scene colour and background are both {self.color!r}: the shape would be invisible"
            )

    @property
    def is_complete(self) -> bool:
        """True when every field is set (the scene can be rendered)."""
        return None not in (self.color, self.background, self.position, self.size)


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _pos_phrase(position: str) -> str:
    return "the center" if position == "center" else f"the {position}"


# Paraphrase templates. Every one must round-trip through `parse_prompt` (the tests check it).
TEMPLATES: tuple[str, ...] = (
    "{a_size} {size} {color} {shape} at {pos} on {a_bg} {bg} background",
    "{a_bg} {bg} background with {a_size} {size} {color} {shape} at {pos}",
    "{size} {color} {shape}, {pos_bare}, on {bg}",
    "{a_size} {size} {shape} in {color} at {pos} of {a_bg} {bg} picture",
)


def caption(scene: Scene, template: int = 0) -> str:
    """Write a caption of a complete scene with template number `template` (see TEMPLATES).

    Raises:
        ValueError: the scene is incomplete or the template number is out of range.
    """
    if not scene.is_complete:
        raise ValueError(f"caption needs a complete scene, got {scene}")
    if not 0 <= template < len(TEMPLATES):
        raise ValueError(f"template={template} is out of range 0..{len(TEMPLATES) - 1}")
    size, position, background = str(scene.size), str(scene.position), str(scene.background)
    return TEMPLATES[template].format(
        a_size=_article(size),
        size=size,
        color=scene.color,
        shape=scene.shape,
        pos=_pos_phrase(position),
        pos_bare=position,
        a_bg=_article(background),
        bg=background,
    )


_SIZE_WORDS = {"small": "small", "tiny": "small", "little": "small", "large": "large", "big": "large"}
_SHAPE_WORDS = {s: s for s in SHAPES} | {s + "s": s for s in SHAPES} | {"disc": "circle", "box": "square"}
_BACKGROUND_NOUNS = {"background", "backdrop", "picture", "canvas"}


def parse_prompt(text: str) -> Scene | None:
    """Read a prompt written in the caption grammar (any template, or a loose variant) back into a scene.

    The background colour is the colour word followed by "background" (or "picture", ...) or
    preceded by "on"; the shape colour is the other colour word. Fields the prompt does not mention
    are None. Returns None when no shape word is found or the prompt is contradictory.
    """
    words = re.findall(r"[a-z]+", text.lower())
    shape = next((_SHAPE_WORDS[w] for w in words if w in _SHAPE_WORDS), None)
    if shape is None:
        return None
    size = next((_SIZE_WORDS[w] for w in words if w in _SIZE_WORDS), None)

    color: str | None = None
    background: str | None = None
    for i, w in enumerate(words):
        if w not in PALETTE:
            continue
        nxt = words[i + 1] if i + 1 < len(words) else ""
        prev = [x for x in words[max(0, i - 2) : i] if x not in ("a", "an", "the")]
        if nxt in _BACKGROUND_NOUNS or (prev and prev[-1] == "on"):
            background = background or w
        else:
            color = color or w

    row = next((r for r in ("top", "bottom") if r in words), None)
    col = next((c for c in ("left", "right") if c in words), None)
    position: str | None
    if row is None and col is None:
        position = "center" if ("center" in words or "middle" in words) else None
    elif row is None:
        position = f"middle {col}"
    elif col is None:
        position = f"{row} center"
    else:
        position = f"{row} {col}"
    try:
        return Scene(shape=shape, color=color, background=background, position=position, size=size)
    except ValueError:
        return None


def sample_scenes(n: int, seed: int = 0) -> list[Scene]:
    """`n` complete scenes drawn uniformly (shape colour != background), reproducibly from `seed`."""
    rng = np.random.default_rng(seed)
    scenes: list[Scene] = []
    while len(scenes) < n:
        color, background = rng.choice(len(COLORS), size=2, replace=False)
        scenes.append(
            Scene(
                shape=SHAPES[rng.integers(len(SHAPES))],
                color=COLORS[color],
                background=COLORS[background],
                position=POSITIONS[rng.integers(len(POSITIONS))],
                size=SIZES[rng.integers(len(SIZES))],
            )
        )
    return scenes


def position_center(position: str) -> tuple[float, float]:
    """(x, y) of a grid position as fractions of the image side."""
    row, col = divmod(POSITIONS.index(position), 3)
    return CELL_CENTERS[col], CELL_CENTERS[row]


def shape_coverage(
    shape: str, cx: float, cy: float, extent: float, size: int = 64, ss: int = 4
) -> np.ndarray:
    """Anti-aliased coverage (float32 HxW in [0,1]) of a shape with centroid (cx, cy) and bounding-box
    side `extent`, all in pixels, by `ss`x`ss` supersampling."""
    if shape not in SHAPES:
        raise ValueError(f"shape={shape!r} is not one of {', '.join(SHAPES)}")
    coords = (np.arange(size * ss, dtype=np.float32) + 0.5) / ss
    u = (coords[None, :] - cx) / extent
    v = (coords[:, None] - cy) / extent
    if shape == "circle":
        inside = u * u + v * v <= 0.25
    elif shape == "square":
        inside = (np.abs(u) <= 0.5) & (np.abs(v) <= 0.5)
    elif shape == "triangle":
        # Apex up, base = height = extent, centroid at the origin: apex at v=-2/3, base at v=1/3.
        inside = (v <= 1 / 3) & (np.abs(u) <= (v + 2 / 3) / 2)
    elif shape == "ring":
        r2 = u * u + v * v
        inside = (r2 <= 0.25) & (r2 >= 0.0625)
    else:  # cross
        au, av = np.abs(u), np.abs(v)
        inside = ((au <= 0.5) & (av <= 1 / 6)) | ((au <= 1 / 6) & (av <= 0.5))
    return inside.reshape(size, ss, size, ss).mean(axis=(1, 3), dtype=np.float32)


def render(scene: Scene, size: int = 64, *, rng: np.random.Generator | None = None) -> np.ndarray:
    """Render a complete scene as a uint8 HxWx3 image.

    Args:
        scene: a complete scene.
        size: image side in pixels.
        rng: if given, jitter the position and size a little (training data); None renders the
            canonical picture (evaluation ground truth).

    Raises:
        ValueError: the scene is incomplete.
    """
    if not scene.is_complete:
        raise ValueError(f"render needs a complete scene, got {scene}")
    fx, fy = position_center(str(scene.position))
    extent = EXTENTS[str(scene.size)]
    if rng is not None:
        fx += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
        fy += rng.uniform(-POSITION_JITTER, POSITION_JITTER)
        extent *= 1 + rng.uniform(-EXTENT_JITTER, EXTENT_JITTER)
    cov = shape_coverage(scene.shape, fx * size, fy * size, extent * size, size)[..., None]
    fg = np.asarray(PALETTE[str(scene.color)], dtype=np.float32)
    bg = np.asarray(PALETTE[str(scene.background)], dtype=np.float32)
    return np.rint(cov * fg + (1 - cov) * bg).astype(np.uint8)


def render_batch(scenes: list[Scene], size: int = 64, seed: int | None = None) -> np.ndarray:
    """Render scenes into one uint8 array (N, H, W, 3); jittered from `seed` unless it is None."""
    rng = np.random.default_rng(seed) if seed is not None else None
    return np.stack([render(s, size, rng=rng) for s in scenes])


# dit-mini classes: a class is a (colour, shape) pair, like an ImageNet class it leaves the rest
# (background, position, size) to the model. DiT reserves id `num_classes` for "no class"; diffusers'
# DiTPipeline hard-codes that null id as 1000, so the model keeps 1000 label slots and uses the first 40.
NUM_CLASSES = len(COLORS) * len(SHAPES)


def class_label(scene: Scene) -> int:
    """dit-mini class id of a scene (its colour and shape)."""
    if scene.color is None:
        raise ValueError(f"class_label needs the shape colour, got {scene}")
    return COLORS.index(scene.color) * len(SHAPES) + SHAPES.index(scene.shape)


def class_name(class_id: int) -> str:
    """The label of a dit-mini class id, e.g. "red circle"."""
    if not 0 <= class_id < NUM_CLASSES:
        raise ValueError(f"class id {class_id} is out of range 0..{NUM_CLASSES - 1}")
    color, shape = divmod(class_id, len(SHAPES))
    return f"{COLORS[color]} {SHAPES[shape]}"


def id2label() -> dict[int, str]:
    """The `id2label` mapping DiTPipeline takes (`pipe.get_label_ids(["red circle"])` then works)."""
    return {i: class_name(i) for i in range(NUM_CLASSES)}


def scene_of_class(class_id: int) -> Scene:
    """The partial scene a class label asks for (shape and colour only)."""
    return parse_prompt(class_name(class_id)) or Scene(shape="circle")


# A fixed evaluation set: every shape, colour, position row/column, both sizes and every template.
EVAL_SCENES: tuple[Scene, ...] = (
    Scene("circle", "red", "blue", "top left", "large"),
    Scene("square", "yellow", "purple", "center", "small"),
    Scene("triangle", "white", "green", "bottom right", "large"),
    Scene("ring", "orange", "black", "top right", "large"),
    Scene("cross", "blue", "yellow", "bottom left", "large"),
    Scene("circle", "green", "white", "middle right", "small"),
    Scene("triangle", "purple", "orange", "top center", "small"),
    Scene("square", "black", "red", "bottom center", "large"),
)
EVAL_PROMPTS: tuple[str, ...] = tuple(caption(s, i % len(TEMPLATES)) for i, s in enumerate(EVAL_SCENES))
EVAL_CLASSES: tuple[int, ...] = tuple(class_label(s) for s in EVAL_SCENES)


def with_field(scene: Scene, **changes: str | None) -> Scene:
    """A copy of `scene` with some fields changed (validated)."""
    return Scene(**{**asdict(scene), **changes})
