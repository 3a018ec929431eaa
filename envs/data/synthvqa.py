"""SynthVQA: a procedural VQA dataset whose question families respond differently to the knobs.

The package's small MoE VLM must show that per-sample adaptation pays, so each family stresses a
different knob:

* ``coarse``    - colour or shape of one large object (60-120 px). Legible in the low tier's single
                  64-px global view (1/3 resolution); the cheapest configuration answers it.
* ``detail``    - read a tiny glyph (10-13 px tall, 1-px strokes, segment-display style with faint
                  "ghost" unlit segments) marked by a box among small plain shapes, or written on
                  the named one of several shapes. At 1/3 resolution every glyph blurs into the
                  same 3-4 px blob, so the low tier is near chance; the medium tier (2/3 resolution) and the high
                  tier (native-resolution 64-px crops) read it.
* ``reasoning`` - counting, spatial relations and comparisons over objects of 16-36 px, visible in
                  the low tier: the difficulty is computation (top-k, depth), not resolution.
* ``knowledge`` - a memorised fact about the one large object (OK-VQA's "outside knowledge"): the
                  object is as legible as in ``coarse``, the answer is a fixed arbitrary attribute
                  of its (colour, shape) that only the decoder's weights hold (`KNOWLEDGE_TABLE`,
                  40 objects x KNOWLEDGE_NUM_RELATIONS relations), so it needs the decoder's
                  capacity, not resolution (a probe of the decoder alone: tables of ~2k facts
                  spread the recall over the depth, docs/RESULTS.md section 1).

Scenes are plain-data specs (`Scene`) rendered on access by `render_scene` (about 0.4 ms on one
CPU core), so a dataset of any size costs no image memory. Sample ``index`` of
``(split, seed)`` is drawn from its own RNG stream; in addition a scene belongs to the split that
a hash of its spec names (80/10/10 buckets), re-drawing otherwise, so no image - and hence no
(image, question) pair - can occur in two splits, whatever the seeds.

Questions and answers use a small closed vocabulary: `tokenize_words` is the tokenisation rule
and `vocabulary()` lists every word it can yield on any question or answer; `ANSWER_SET` is the
closed answer set (answers are single words, already in the VQA evaluation's normal form).
"""
from __future__ import annotations

import functools
import hashlib
import math
import random
from collections.abc import Sequence
from typing import Callable, NamedTuple, Union

import numpy as np
from PIL import Image, ImageDraw

from envs.data.sample import VQASample

# Image sizes (width, height), varied in size and aspect as real VQA images are, so that a tier's
# per-image crop grid (and the number of vision tokens) varies: at the high tier (9 crops, 64-px
# crops) 128x128 gets 2x2 + global = 5 crops, 192x192 and 160x160 3x3 + global = 10. Object sizes of
# the coarse and reasoning families scale with the long side (so the global view shows them alike);
# glyphs keep their pixel size, like text in a photo.
IMAGE_SIZES: tuple[tuple[int, int], ...] = (
    (128, 128), (160, 160), (192, 192), (192, 128), (128, 192), (256, 128), (128, 256),
)
REFERENCE_SIDE = 192  # the long side at which COARSE/REASONING sizes below are given
FAMILIES = ("coarse", "detail", "reasoning", "knowledge")
SPLITS = ("train", "val", "test")  # the same names as envs.backends.base.SPLITS
DATASET_NAME = "synthvqa"
NUM_ANSWERS = 10  # VQA format: ten reference answers per question
# question_id = (seed * len(SPLITS) + split) * stride + index: unique over (seed, split, index).
QUESTION_ID_STRIDE = 10**9

# A scene's spec hash picks its split: bucket = hash % 10.
_SPLIT_BUCKETS = {"train": range(0, 8), "val": range(8, 9), "test": range(9, 10)}
_BUCKET_SPLIT = {b: s for s, buckets in _SPLIT_BUCKETS.items() for b in buckets}

# Saturated, mutually distinct colours; each object's colour is jittered around its anchor.
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 80, 220),
    "yellow": (240, 220, 40),
    "orange": (245, 140, 20),
    "purple": (140, 60, 190),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
}
COLOR_NAMES = tuple(COLORS)
SHAPES = ("circle", "square", "triangle", "diamond", "star")
SHAPE_PLURALS = {s: s + "s" for s in SHAPES}
DIGITS = tuple("0123456789")
# Straight-stroke capitals, answered in lower case. No "a": the VQA metric strips articles.
LETTERS = tuple("efhklntxyz")
ANSWER_SET: tuple[str, ...] = ("no", "yes") + COLOR_NAMES + SHAPES + DIGITS + LETTERS

# name -> (family, question template). Placeholders are filled from COLOR_NAMES / SHAPES.
TEMPLATES: dict[str, tuple[str, str]] = {
    "big_color": ("coarse", "what color is the big shape?"),
    "big_shape": ("coarse", "what shape is the big object?"),
    "box_digit": ("detail", "what digit is in the box?"),
    "box_letter": ("detail", "what letter is in the box?"),
    "label_digit": ("detail", "what digit is on the {color} {shape}?"),
    "count_shape": ("reasoning", "how many {shapes} are there?"),
    "count_color": ("reasoning", "how many {color} shapes are there?"),
    "left_of": ("reasoning", "is the {color1} {shape1} left of the {color2} {shape2}?"),
    "above": ("reasoning", "is the {color1} {shape1} above the {color2} {shape2}?"),
    "more_often": ("reasoning", "which color appears more often?"),
    "bigger": ("reasoning", "which {shape} is bigger, the {color1} one or the {color2} one?"),
    "fact": ("knowledge", "what is fact {relation} of the big shape?"),
}
# The knowledge family's facts: KNOWLEDGE_TABLE[(colour, shape, relation)] is one of KNOWLEDGE_ANSWERS,
# drawn once from a fixed seed so that every answer occurs about equally often. A relation is named
# by a letter and a digit ("fact k 7"), so the table grows without new words; which pairs are used
# is a fixed shuffle of all 100.
KNOWLEDGE_NUM_RELATIONS = 48


def _knowledge_relations() -> tuple[str, ...]:
    pairs = [f"{letter} {digit}" for letter in LETTERS for digit in DIGITS]
    random.Random("synthvqa:knowledge-relations").shuffle(pairs)
    return tuple(pairs[:KNOWLEDGE_NUM_RELATIONS])


KNOWLEDGE_RELATIONS = _knowledge_relations()
KNOWLEDGE_ANSWERS = COLOR_NAMES + SHAPES + DIGITS + LETTERS


def _knowledge_table() -> dict[tuple[str, str, str], str]:
    keys = [(c, s, r) for c in COLOR_NAMES for s in SHAPES for r in KNOWLEDGE_RELATIONS]
    answers = [KNOWLEDGE_ANSWERS[i % len(KNOWLEDGE_ANSWERS)] for i in range(len(keys))]
    random.Random("synthvqa:knowledge-table").shuffle(answers)
    return dict(zip(keys, answers))


KNOWLEDGE_TABLE = _knowledge_table()
FAMILY_TEMPLATES = {f: tuple(n for n, (fam, _) in TEMPLATES.items() if fam == f) for f in FAMILIES}

# Glyph geometry, drawn per glyph: 1-px strokes; width = aspect * height; italic slant in px.
GLYPH_HEIGHT_RANGE = (10, 13)
GLYPH_ASPECT_RANGE = (0.5, 0.75)
LETTER_ASPECT_RANGE = (0.7, 0.9)  # the 14-segment layout needs room for its diagonals
GLYPH_SLANT_RANGE = (-2, 2)
COARSE_SIZE_RANGE = (60, 120)
REASONING_SIZE_RANGE = (20, 28)


def tokenize_words(text: str) -> list[str]:
    """The word tokenisation every SynthVQA question and answer obeys.

    Lower-case, split on whitespace, strip the punctuation characters ``?,.`` from both ends of
    each token, drop tokens that end up empty. The model's tokenizer must apply the same rule.
    """
    return [w for w in (t.strip("?,.") for t in text.lower().split()) if w]


def answer_vocabulary() -> list[str]:
    """The closed answer set, in the fixed order of `ANSWER_SET` (usable as class indices)."""
    return list(ANSWER_SET)


def vocabulary() -> list[str]:
    """Every word `tokenize_words` can yield on any SynthVQA question or answer, sorted."""
    words = set(ANSWER_SET) | set(COLOR_NAMES) | set(SHAPES) | set(SHAPE_PLURALS.values())
    for _, template in TEMPLATES.values():
        words.update(w for w in tokenize_words(template) if not w.startswith("{"))
    return sorted(words)


# ----------------------------------------------------------------------------- scene specs
Color = tuple[int, int, int]


class Shape(NamedTuple):
    kind: str  # one of SHAPES
    color: Color
    cx: int  # centre
    cy: int
    size: int  # side of the square bounding box, px


class Glyph(NamedTuple):
    char: str  # one of DIGITS (7-segment) or LETTERS (stroke capitals)
    x: int  # top-left corner of the unslanted glyph
    y: int
    width: int  # px
    height: int  # px
    slant: int  # horizontal offset of the top edge relative to the bottom edge, px
    color: Color  # ink of the lit segments
    ghost: Color  # ink of the unlit segments: 1/GHOST_WIDTH of the way from background to ink

    def bbox(self) -> tuple[int, int, int, int]:
        """Inclusive (x0, y0, x1, y1) of the pixels the glyph can touch (ghost bands included)."""
        pad = GHOST_WIDTH // 2
        return (self.x + min(0, self.slant) - pad, self.y - pad,
                self.x + self.width - 1 + max(0, self.slant) + pad, self.y + self.height - 1 + pad)


class Box(NamedTuple):
    x0: int  # inclusive corners of a 1-px outline
    y0: int
    x1: int
    y1: int
    color: Color


Item = Union[Shape, Glyph, Box]


class Scene(NamedTuple):
    """Everything `render_scene` needs; hashable, and its repr is its identity for split hashing."""

    width: int
    height: int
    background: Color
    texture: int  # index into the precomputed textures; -1 = plain background
    texture_amplitude: int  # peak +- intensity of the texture
    items: tuple[Item, ...]  # drawn in order


class SynthRecord(NamedTuple):
    """A generated sample before wrapping as VQASample (kept for tests and analysis)."""

    scene: Scene
    question: str
    answer: str
    family: str
    template: str
    image_id: str  # hex hash of the scene spec: equal images have equal ids


# ----------------------------------------------------------------------------- rendering
NUM_TEXTURES = 4


@functools.lru_cache(maxsize=None)
def _texture(index: int, width: int, height: int) -> np.ndarray:
    """Smooth value-noise field `index` in [-64, 64] (int16) at this size, upsampled from a coarse
    random grid (6, 12, 24 or 48 cells per reference side)."""
    cells = (6, 12, 24, 48)[index]
    rng = np.random.default_rng([20240601, index])
    coarse = rng.integers(0, 256, size=(max(2, cells * height // REFERENCE_SIDE), max(2, cells * width // REFERENCE_SIDE)),
                          dtype=np.uint8)
    smooth = Image.fromarray(coarse, "L").resize((width, height), Image.Resampling.BICUBIC)
    return (np.asarray(smooth, dtype=np.int16) - 128) // 2

_star = [(math.cos(math.radians(-90 + 36 * i)) * (1.0 if i % 2 == 0 else 0.45),
          math.sin(math.radians(-90 + 36 * i)) * (1.0 if i % 2 == 0 else 0.45)) for i in range(10)]
# Unit polygons in [-1, 1]^2 around the centre; circle and square are drawn as primitives.
_POLYGONS = {
    "triangle": [(0.0, -1.0), (1.0, 1.0), (-1.0, 1.0)],
    "diamond": [(0.0, -1.0), (1.0, 0.0), (0.0, 1.0), (-1.0, 0.0)],
    "star": _star,
}

# Glyphs are segment displays in a unit box (x right, y down): digits on a 7-segment layout,
# letters on a 14-segment layout. Lit segments are 1-px lines in full ink; every unlit segment of
# the layout is a 3-px band at 1/3 contrast ("ghost"), centred on the same line. Both carry the
# same ink per unit length at the same place, so after the low tier's 3x downsampling every glyph
# of a layout blurs into the same blob, while at native resolution the lit strokes read clearly.
_SEGMENTS = {
    "a": ((0, 0), (1, 0)), "b": ((1, 0), (1, 0.5)), "c": ((1, 0.5), (1, 1)), "d": ((0, 1), (1, 1)),
    "e": ((0, 0.5), (0, 1)), "f": ((0, 0), (0, 0.5)), "g": ((0, 0.5), (0.5, 0.5)),
    "G": ((0.5, 0.5), (1, 0.5)), "h": ((0, 0), (0.5, 0.5)), "i": ((0.5, 0), (0.5, 0.5)),
    "j": ((1, 0), (0.5, 0.5)), "k": ((0, 1), (0.5, 0.5)), "l": ((1, 1), (0.5, 0.5)),
    "m": ((0.5, 0.5), (0.5, 1)),
}
_DIGIT_LAYOUT = "abcdefgG"
_LETTER_LAYOUT = "abcdefgGhijklm"
_LIT_SEGMENTS = {
    "0": "abcdef", "1": "bc", "2": "abgGed", "3": "abgGcd", "4": "fgGbc",
    "5": "afgGcd", "6": "afgGedc", "7": "abc", "8": "abcdefgG", "9": "abcdfgG",
    "e": "adefg", "f": "aefg", "h": "bcefgG", "k": "efgjl", "l": "def",
    "n": "bcefhl", "t": "aim", "x": "hjkl", "y": "hjm", "z": "adjk",
}
GHOST_WIDTH = 3  # px; ghost ink is 1/GHOST_WIDTH of the way from the background to the ink


def _draw_shape(draw: ImageDraw.ImageDraw, s: Shape) -> None:
    r = s.size / 2
    if s.kind == "circle":
        draw.ellipse((s.cx - r, s.cy - r, s.cx + r - 1, s.cy + r - 1), fill=s.color)
    elif s.kind == "square":
        draw.rectangle((s.cx - r, s.cy - r, s.cx + r - 1, s.cy + r - 1), fill=s.color)
    else:
        draw.polygon([(s.cx + u * r, s.cy + v * r) for u, v in _POLYGONS[s.kind]], fill=s.color)


def _draw_glyph(draw: ImageDraw.ImageDraw, g: Glyph) -> None:
    w, h = g.width - 1, g.height - 1
    lit = _LIT_SEGMENTS[g.char]
    layout = _DIGIT_LAYOUT if g.char in DIGITS else _LETTER_LAYOUT

    def points(segment: str) -> list[tuple[float, float]]:
        return [(g.x + u * w + g.slant * (1 - v), g.y + v * h) for u, v in _SEGMENTS[segment]]

    for segment in layout:  # ghosts first so lit strokes stay on top where they meet
        if segment not in lit:
            draw.line(points(segment), fill=g.ghost, width=GHOST_WIDTH)
    for segment in lit:
        draw.line(points(segment), fill=g.color, width=1)


def render_scene(scene: Scene) -> Image.Image:
    """Render a scene spec to a fresh RGB image of the scene's size (deterministic)."""
    if scene.texture < 0:
        image = Image.new("RGB", (scene.width, scene.height), scene.background)
    else:
        noise = (_texture(scene.texture, scene.width, scene.height) * scene.texture_amplitude) // 64
        pixels = np.asarray(scene.background, dtype=np.int16) + noise[..., None]
        image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(image)
    for item in scene.items:
        if isinstance(item, Shape):
            _draw_shape(draw, item)
        elif isinstance(item, Glyph):
            _draw_glyph(draw, item)
        else:
            draw.rectangle((item.x0, item.y0, item.x1, item.y1), outline=item.color, width=1)
    return image


def render(sample: VQASample) -> Image.Image:
    """The sample's image (SynthVQA samples render on access; kept for symmetry with datasets)."""
    return sample.image_loader()


# ----------------------------------------------------------------------------- generators
def _color(rng: random.Random, name: str) -> Color:
    """Anchor colour jittered by +-10 per channel so colour naming must tolerate variation."""
    return tuple(min(255, max(0, c + rng.randint(-10, 10))) for c in COLORS[name])


def _luminance(rgb: Color) -> float:
    return 0.299 * rgb[0] + 0.587 * rgb[1] + 0.114 * rgb[2]


def _ink_on(rng: random.Random, rgb: Color) -> Color:
    """Black or white (jittered) ink that contrasts with `rgb`."""
    return _color(rng, "black" if _luminance(rgb) > 140 else "white")


class Canvas(NamedTuple):
    width: int
    height: int
    background: Color

    @property
    def scale(self) -> float:
        """Object scale of the coarse and reasoning families: the long side over REFERENCE_SIDE."""
        return max(self.width, self.height) / REFERENCE_SIDE

    def grid(self, cell: int) -> tuple[int, int]:
        """(cols, rows) of cell x cell px cells that fit."""
        return self.width // cell, self.height // cell


def _grid_positions(rng: random.Random, n: int, canvas: Canvas, cell: int, sizes: Sequence[int]) -> list[tuple[int, int]]:
    """Centres for n objects in distinct cells of cell-px cells over the canvas, jittered within the cell.

    Each object's bounding box stays inside its own cell, so objects never overlap.
    """
    cols, rows = canvas.grid(cell)
    if n > cols * rows:
        raise ValueError(f"{n} objects do not fit {cols}x{rows} cells of {cell} px")
    off_x, off_y = (canvas.width - cell * cols) // 2, (canvas.height - cell * rows) // 2
    cells = rng.sample(range(cols * rows), n)
    centres = []
    for c, size in zip(cells, sizes):
        slack = max(0, (cell - size) // 2)
        cx = off_x + (c % cols) * cell + cell // 2 + rng.randint(-slack, slack)
        cy = off_y + (c // cols) * cell + cell // 2 + rng.randint(-slack, slack)
        centres.append((cx, cy))
    return centres


_REASONING_CELL = 38  # px at REFERENCE_SIDE: 5x5 cells on a 192-px square, objects <= 36 px


def _reasoning_cell(canvas: Canvas) -> int:
    return round(_REASONING_CELL * canvas.scale)


def _reasoning_capacity(canvas: Canvas) -> int:
    cols, rows = canvas.grid(_reasoning_cell(canvas))
    return cols * rows


def _reasoning_objects(rng: random.Random, specs: list[tuple[str, str, int]], canvas: Canvas) -> list[Shape]:
    """Shapes for (colour, kind, size) specs, shuffled into distinct cells of the reasoning grid."""
    centres = _grid_positions(rng, len(specs), canvas, _reasoning_cell(canvas), [s for _, _, s in specs])
    return [Shape(k, _color(rng, c), cx, cy, s) for (c, k, s), (cx, cy) in zip(specs, centres)]


def _reasoning_size(rng: random.Random, canvas: Canvas, low: int | None = None, high: int | None = None) -> int:
    low, high = (low, high) if low is not None else REASONING_SIZE_RANGE
    return round(rng.randint(low, high) * canvas.scale)


def _other_combo(rng: random.Random, exclude: set[tuple[str, str]]) -> tuple[str, str]:
    while True:
        combo = (rng.choice(COLOR_NAMES), rng.choice(SHAPES))
        if combo not in exclude:
            return combo


Generated = tuple[list[Item], str, str]  # items, question, answer
Generator = Callable[[random.Random, str, Canvas], Generated]


def _big_object_scene(rng: random.Random, canvas: Canvas) -> tuple[list[Item], str, str]:
    """One large object (colour, shape) plus a few tiny distractors: (items, colour, shape)."""
    margin = 4
    size = min(round(rng.randint(*COARSE_SIZE_RANGE) * canvas.scale), min(canvas.width, canvas.height) - 2 * margin)
    half = size // 2
    cx = rng.randint(half + margin, canvas.width - half - margin)
    cy = rng.randint(half + margin, canvas.height - half - margin)
    color, kind = rng.choice(COLOR_NAMES), rng.choice(SHAPES)
    items: list[Item] = [Shape(kind, _color(rng, color), cx, cy, size)]
    # A few tiny distractors (6-12 px) outside the big object's box: noise, not competitors.
    for _ in range(rng.randint(0, 4)):
        s = rng.randint(6, 12)
        for _ in range(20):
            x, y = rng.randint(s, canvas.width - s), rng.randint(s, canvas.height - s)
            gap = half + s // 2 + 2  # boxes separated on either axis do not intersect
            if abs(x - cx) > gap or abs(y - cy) > gap:
                items.append(Shape(rng.choice(SHAPES), _color(rng, rng.choice(COLOR_NAMES)), x, y, s))
                break
    return items, color, kind


def _gen_big_object(rng: random.Random, template: str, canvas: Canvas) -> Generated:
    items, color, kind = _big_object_scene(rng, canvas)
    return items, TEMPLATES[template][1], color if template == "big_color" else kind


def _gen_fact(rng: random.Random, template: str, canvas: Canvas) -> Generated:
    items, color, kind = _big_object_scene(rng, canvas)
    relation = rng.choice(KNOWLEDGE_RELATIONS)
    return items, TEMPLATES[template][1].format(relation=relation), KNOWLEDGE_TABLE[(color, kind, relation)]


def _random_glyph(rng: random.Random, char: str, cx: int, cy: int, ink: Color, under: Color) -> Glyph:
    """A glyph of random size and style centred near (cx, cy), drawn over colour `under`.

    Size, aspect and slant vary per glyph so that a low-resolution view cannot match a handful of
    fixed templates; at native resolution the lit strokes stay readable whatever the style.
    """
    h = rng.randint(*GLYPH_HEIGHT_RANGE)
    aspect = rng.uniform(*(GLYPH_ASPECT_RANGE if char in DIGITS else LETTER_ASPECT_RANGE))
    w = max(5, round(h * aspect))
    slant = rng.randint(*GLYPH_SLANT_RANGE)
    ghost = tuple(round(b + (i - b) / GHOST_WIDTH) for i, b in zip(ink, under))
    return Glyph(char, cx - (w + slant) // 2, cy - h // 2, w, h, slant, ink, ghost)


_GLYPH_CELL = 24  # px: a glyph (<= 16 x 15 with slant and ghosts) plus its box fits in one


def _gen_box_glyph(rng: random.Random, template: str, canvas: Canvas) -> Generated:
    """One boxed glyph among small plain shapes (clutter that is not text)."""
    charset = DIGITS if template == "box_digit" else LETTERS
    cell = _GLYPH_CELL
    cols, rows = canvas.grid(cell)
    ink = _color(rng, rng.choice(("black", "white")))  # ink colour tells nothing about the glyph
    cells = rng.sample(range(cols * rows), 1 + rng.randint(1, 4))
    c = cells[0]
    cx = c % cols * cell + cell // 2 + rng.randint(-1, 1)
    cy = c // cols * cell + cell // 2 + rng.randint(-1, 1)
    target = _random_glyph(rng, rng.choice(charset), cx, cy, ink, canvas.background)
    x0, y0, x1, y1 = target.bbox()
    m = 2  # box margin: the box marks the glyph without touching it
    colour = rng.choice(("red", "green", "blue", "yellow", "orange", "purple"))
    items: list[Item] = [target, Box(x0 - m, y0 - m, x1 + m, y1 + m, _color(rng, colour))]
    for c in cells[1:]:
        items.append(Shape(rng.choice(SHAPES), _color(rng, rng.choice(COLOR_NAMES)),
                           c % cols * cell + cell // 2, c // cols * cell + cell // 2, rng.randint(6, 12)))
    return items, TEMPLATES[template][1], target.char


_LABEL_CELL = 48  # px: a 36-46 px shape holding a digit


def _gen_label_digit(rng: random.Random, template: str, canvas: Canvas) -> Generated:
    """A digit written on the named shape; the other shapes are blank."""
    cols, rows = canvas.grid(_LABEL_CELL)
    n = rng.randint(3, min(5, cols * rows))
    target = (rng.choice(COLOR_NAMES), rng.choice(SHAPES))
    combos = [target] + [_other_combo(rng, {target}) for _ in range(n - 1)]
    sizes = [rng.randint(36, 46) for _ in combos]
    items: list[Item] = []
    centres = _grid_positions(rng, n, canvas, _LABEL_CELL, sizes)
    for i, ((color, kind), size, (cx, cy)) in enumerate(zip(combos, sizes, centres)):
        shape = Shape(kind, _color(rng, color), cx, cy, size)
        items.append(shape)
        if i == 0:  # the named shape
            # Triangles' interior is widest low down: centre the digit on their centroid.
            gy = cy + (size // 6 if kind == "triangle" else 0)
            items.append(_random_glyph(rng, rng.choice(DIGITS), cx, gy, _ink_on(rng, shape.color), shape.color))
    question = TEMPLATES[template][1].format(color=target[0], shape=target[1])
    return items, question, items[1].char


def _gen_count(rng: random.Random, template: str, canvas: Canvas) -> Generated:
    count = rng.randint(1, 6)
    n_distractors = rng.randint(0, min(5, _reasoning_capacity(canvas) - count))
    if template == "count_shape":
        kind = rng.choice(SHAPES)
        specs = [(rng.choice(COLOR_NAMES), kind, _reasoning_size(rng, canvas)) for _ in range(count)]
        others = [k for k in SHAPES if k != kind]
        specs += [(rng.choice(COLOR_NAMES), rng.choice(others), _reasoning_size(rng, canvas))
                  for _ in range(n_distractors)]
        question = TEMPLATES[template][1].format(shapes=SHAPE_PLURALS[kind])
    else:
        color = rng.choice(COLOR_NAMES)
        specs = [(color, rng.choice(SHAPES), _reasoning_size(rng, canvas)) for _ in range(count)]
        others = [c for c in COLOR_NAMES if c != color]
        specs += [(rng.choice(others), rng.choice(SHAPES), _reasoning_size(rng, canvas))
                  for _ in range(n_distractors)]
        question = TEMPLATES[template][1].format(color=color)
    return list(_reasoning_objects(rng, specs, canvas)), question, str(count)


def _gen_relation(rng: random.Random, template: str, canvas: Canvas) -> Generated:
    """Two uniquely described referents in distinct columns (left_of) or rows (above)."""
    a = (rng.choice(COLOR_NAMES), rng.choice(SHAPES))
    b = _other_combo(rng, {a})
    specs = [(*a, _reasoning_size(rng, canvas)), (*b, _reasoning_size(rng, canvas))]
    specs += [(*_other_combo(rng, {a, b}), _reasoning_size(rng, canvas)) for _ in range(rng.randint(1, 6))]
    axis = 0 if template == "left_of" else 1
    answer = rng.choice(("yes", "no"))
    while True:  # re-draw the layout until the referents differ on the asked axis
        objects = _reasoning_objects(rng, specs, canvas)
        pa, pb = objects[0][2 + axis], objects[1][2 + axis]  # cx or cy
        if abs(pa - pb) >= 16 * canvas.scale:
            break
    if (pa < pb) != (answer == "yes"):  # swap the referents' positions to realise the answer
        oa, ob = objects[0], objects[1]
        objects[0] = oa._replace(cx=ob.cx, cy=ob.cy)
        objects[1] = ob._replace(cx=oa.cx, cy=oa.cy)
    question = TEMPLATES[template][1].format(color1=a[0], shape1=a[1], color2=b[0], shape2=b[1])
    return list(objects), question, answer


def _gen_more_often(rng: random.Random, template: str, canvas: Canvas) -> Generated:
    colors = rng.sample(COLOR_NAMES, rng.randint(2, 3))
    while True:
        counts = [rng.randint(1, 6) for _ in colors]
        if counts.count(max(counts)) == 1 and sum(counts) <= _reasoning_capacity(canvas):
            break
    specs = [(c, rng.choice(SHAPES), _reasoning_size(rng, canvas)) for c, k in zip(colors, counts) for _ in range(k)]
    answer = colors[counts.index(max(counts))]
    return list(_reasoning_objects(rng, specs, canvas)), TEMPLATES[template][1], answer


def _gen_bigger(rng: random.Random, template: str, canvas: Canvas) -> Generated:
    """Same shape, two colours; sizes differ by >= 1.5x so the bigger one is clear at low tier."""
    kind = rng.choice(SHAPES)
    c1, c2 = rng.sample(COLOR_NAMES, 2)
    small, big = _reasoning_size(rng, canvas, 16, 20), _reasoning_size(rng, canvas, 30, 36)
    big = max(big, math.ceil(1.5 * small))  # the ratio must survive rounding at small scales
    first_bigger = rng.random() < 0.5
    specs = [(c1, kind, big if first_bigger else small), (c2, kind, small if first_bigger else big)]
    specs += [(*_other_combo(rng, {(c1, kind), (c2, kind)}), _reasoning_size(rng, canvas, 16, 36))
              for _ in range(rng.randint(1, 5))]
    question = TEMPLATES[template][1].format(shape=kind, color1=c1, color2=c2)
    return list(_reasoning_objects(rng, specs, canvas)), question, c1 if first_bigger else c2


_GENERATORS: dict[str, Generator] = {
    "big_color": _gen_big_object,
    "big_shape": _gen_big_object,
    "box_digit": _gen_box_glyph,
    "box_letter": _gen_box_glyph,
    "label_digit": _gen_label_digit,
    "count_shape": _gen_count,
    "count_color": _gen_count,
    "left_of": _gen_relation,
    "above": _gen_relation,
    "more_often": _gen_more_often,
    "bigger": _gen_bigger,
    "fact": _gen_fact,
}


def _background(rng: random.Random) -> tuple[Color, int, int]:
    """Mid-grey with a slight tint (contrasts with every palette colour, black and white ink);
    a third of scenes are plain, the rest carry a faint smooth texture."""
    grey = rng.randint(105, 155)
    color = tuple(grey + rng.randint(-12, 12) for _ in range(3))
    if rng.random() < 1 / 3:
        return color, -1, 0
    return color, rng.randrange(NUM_TEXTURES), rng.randint(4, 14)


def scene_split(scene: Scene) -> tuple[str, str]:
    """(split, image_id) of a scene: a hash of its spec picks the split's bucket."""
    digest = hashlib.blake2b(repr(scene).encode(), digest_size=8).digest()
    return _BUCKET_SPLIT[int.from_bytes(digest, "big") % 10], digest.hex()


def generate(split: str, seed: int, index: int, family: str, size: tuple[int, int] = IMAGE_SIZES[2]) -> SynthRecord:
    """Sample `index` of (split, seed) in `family` on a (width, height) image: deterministic, and its
    scene hashes to `split`."""
    rng = random.Random(f"{DATASET_NAME}:{seed}:{split}:{index}")  # str seeds hash via SHA-512
    width, height = size
    while True:  # rejection keeps every split's distribution identical (the hash ignores content)
        template = rng.choice(FAMILY_TEMPLATES[family])
        background, texture, amplitude = _background(rng)
        items, question, answer = _GENERATORS[template](rng, template, Canvas(width, height, background))
        scene = Scene(width, height, background, texture, amplitude, tuple(items))
        scene_split_name, image_id = scene_split(scene)
        if scene_split_name == split:
            return SynthRecord(scene, question, answer, family, template, image_id)


# ----------------------------------------------------------------------------- dataset
def _family_counts(num_samples: int, weights: dict[str, float]) -> dict[str, int]:
    """Exact per-family counts for the weights (largest-remainder rounding)."""
    total = sum(weights.values())
    quotas = {f: num_samples * weights[f] / total for f in FAMILIES}
    counts = {f: int(q) for f, q in quotas.items()}
    by_remainder = sorted(FAMILIES, key=lambda f: (-(quotas[f] - counts[f]), FAMILIES.index(f)))
    for f in by_remainder[: num_samples - sum(counts.values())]:
        counts[f] += 1
    return counts


class SynthVQA(Sequence):
    """`num_samples` SynthVQA samples of `split`, deterministic in (split, num_samples, seed, weights).

    Families get exact shares from `family_weights` (default: equal shares; families missing from
    the dict get weight 0), shuffled over the indices by the seed; each index also gets one of
    IMAGE_SIZES, uniformly at random from the seed (`size_index`, so batches can be grouped by size
    without generating samples). Samples are generated on access
    (~0.1 ms, more for val/test because of split rejection) and images render on access.
    """

    def __init__(self, split: str, num_samples: int, seed: int = 0, family_weights: dict | None = None):
        if split not in SPLITS:
            raise ValueError(f"SynthVQA split={split!r}: expected one of {SPLITS}")
        if isinstance(num_samples, bool) or not isinstance(num_samples, int) \
                or not 0 < num_samples <= QUESTION_ID_STRIDE:
            raise ValueError(f"SynthVQA num_samples={num_samples!r}: expected an int in [1, {QUESTION_ID_STRIDE}]")
        if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
            raise ValueError(f"SynthVQA seed={seed!r}: expected an int >= 0")
        weights = self._check_weights(family_weights)
        self.split, self.num_samples, self.seed = split, num_samples, seed
        self.family_weights = weights
        self.family_counts = _family_counts(num_samples, weights)
        labels = np.repeat(np.arange(len(FAMILIES), dtype=np.uint8), [self.family_counts[f] for f in FAMILIES])
        np.random.default_rng([seed, SPLITS.index(split)]).shuffle(labels)
        self._families = labels
        self._sizes = np.random.default_rng([seed, SPLITS.index(split), 1]).integers(
            0, len(IMAGE_SIZES), num_samples, dtype=np.uint8)
        self._qid_base = (seed * len(SPLITS) + SPLITS.index(split)) * QUESTION_ID_STRIDE

    @staticmethod
    def _check_weights(family_weights: dict | None) -> dict[str, float]:
        if family_weights is None:
            return {f: 1.0 for f in FAMILIES}
        unknown = sorted(set(family_weights) - set(FAMILIES), key=str)
        if unknown:
            raise ValueError(f"SynthVQA family_weights has unknown family {unknown}: expected keys among {FAMILIES}")
        weights = {f: family_weights.get(f, 0.0) for f in FAMILIES}
        for f, w in weights.items():
            if isinstance(w, bool) or not isinstance(w, (int, float)) or not math.isfinite(w) or w < 0:
                raise ValueError(f"SynthVQA family_weights[{f!r}]={w!r}: expected a finite number >= 0")
        if sum(weights.values()) <= 0:
            raise ValueError(f"SynthVQA family_weights={family_weights!r}: expected at least one weight > 0")
        return {f: float(w) for f, w in weights.items()}

    def __len__(self) -> int:
        return self.num_samples

    def family(self, index: int) -> str:
        return FAMILIES[self._families[self._index(index)]]

    @property
    def family_index(self) -> np.ndarray:
        """Index into FAMILIES of every sample (uint8, read-only view)."""
        view = self._families.view()
        view.flags.writeable = False
        return view

    @property
    def size_index(self) -> np.ndarray:
        """Index into IMAGE_SIZES of every sample (uint8, read-only view)."""
        view = self._sizes.view()
        view.flags.writeable = False
        return view

    def record(self, index: int) -> SynthRecord:
        """The generated spec (scene, question, answer, template, ...) of sample `index`."""
        i = self._index(index)
        return generate(self.split, self.seed, i, FAMILIES[self._families[i]], IMAGE_SIZES[self._sizes[i]])

    def __getitem__(self, index):
        if isinstance(index, slice):
            return [self[i] for i in range(*index.indices(self.num_samples))]
        i = self._index(index)
        rec = self.record(i)
        return VQASample(
            question=rec.question,
            answers=[rec.answer] * NUM_ANSWERS,
            question_id=self._qid_base + i,
            dataset=DATASET_NAME,
            image_loader=functools.partial(render_scene, rec.scene),
            family=rec.family,
            image_id=rec.image_id,
        )

    def _index(self, index) -> int:
        if isinstance(index, bool) or not isinstance(index, (int, np.integer)):
            raise TypeError(f"SynthVQA index={index!r}: expected an int or a slice")
        i = int(index) + (self.num_samples if index < 0 else 0)
        if not 0 <= i < self.num_samples:
            raise IndexError(f"SynthVQA index={index} out of range for {self.num_samples} samples")
        return i

    def __repr__(self) -> str:
        return (f"SynthVQA(split={self.split!r}, num_samples={self.num_samples}, seed={self.seed}, "
                f"family_counts={self.family_counts})")
