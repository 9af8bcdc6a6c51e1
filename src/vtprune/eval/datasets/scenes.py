"""``scenes``: synthetic subject / background scenes made from real photos, with questions about each part.

A scene is a 448 x 448 RGB canvas (the bundled model's input size; 14 x 14 visual tokens of 32 px):

* **subject**: an ImageNet sample photo, centre-cropped to a square, resized (bicubic) to 45-60 % of the
  side and pasted near the centre (offset up to 16 px);
* **background**: a flat named colour (40 %), stripes (15 %) or a checkerboard (15 %) of a colour and
  its 80 % shade, colour noise (10 %, Gaussian, sd 20 per channel), or another photo of the same split
  (20 %, centre crop resized to the canvas);
* **periphery**: 0, 1 or 2 (equally likely) small named-colour shapes (circle / square / triangle,
  8-12 % of the side, never the background's colour, drawn without anti-aliasing) at distinct anchors
  among the 4 corners and 4 edge midpoints, 4-12 px from the edges. By construction they never overlap
  the subject (the subject stays >= 73 px from every edge, shapes within 66 px).

Questions (``kind``; ``meta["qtype"]``):
  subject: "Is there a(n) {label} in the image?" yes, and the same with another label of the split
  (never the subject's nor a background photo's) -> no; "What is in the image?" -> label (not asked
  when the background is a photo: two objects);
  background (colour backgrounds only): "What color is the background?" -> colour; "Is the background
  {colour}?" yes and with another colour -> no;
  periphery: "Is there a small {colour} {shape} at the edge of the image?" yes (a present shape) and
  no (a present shape with its colour or its shape changed to a combination not present), asked only
  when a shape is present so yes and no stay balanced; "How many small shapes are at the edges?" -> digit.

Splits: ``test`` uses the 200 held-out ImageNet images as subjects (and background photos), ``train``
the 800 training images (:func:`vtprune.eval.datasets.split_imagenet`), so the two never share a photo.
Scene ``s`` of a split has subject ``s`` of the split's order and its own ``random.Random`` stream
(seeded by split, seed and ``s``), so a prefix of the scenes does not depend on how many are built.
Sizes with seed 0: test 200 scenes, 1508 questions (subject 562, background 486, periphery 460; every
yes/no group balanced); train 800 scenes, 6074 questions. In memory each scene's image is 0.6 MB (the
whole test split about 120 MB, built in 4.6 s on the shared 2-core machine); :func:`write_scenes` stores PNGs.

``meta`` (every question of a scene carries the scene's): ``scene``, ``canvas`` (448), ``subject``
{``file``, ``wnid``, ``label``, ``bbox``}, ``background`` {``kind``, ``color`` or None, ``file`` /
``label`` for a photo}, ``shapes`` [{``shape``, ``color``, ``bbox``}], ``qtype``; boxes are pixel
``[x0, y0, x1, y1]`` with x1, y1 exclusive.

Source: reconstructed for this project (a controlled probe, not a published benchmark): the subject /
background / edge split lets a plot show which visual tokens each pruning method keeps for each part.
"""

from __future__ import annotations

import json
import random
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

from vtprune.eval.datasets.base import Sample, default_data_root, imagenet_split, object_question, sample_row
from vtprune.eval.datasets.registry import register_dataset

CANVAS = 448
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 20, 20), "green": (20, 160, 40), "blue": (30, 60, 220), "yellow": (240, 220, 20),
    "orange": (255, 140, 0), "purple": (130, 40, 170), "pink": (255, 105, 180), "brown": (120, 70, 20),
    "white": (255, 255, 255), "black": (0, 0, 0), "gray": (128, 128, 128),
}
TEXTURE_COLORS = tuple(c for c in COLORS if c not in ("white", "black", "gray"))  # a shade of these is clear
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {"flat": 0.4, "stripes": 0.15, "checkerboard": 0.15, "noise": 0.1, "photo": 0.2}
SUBJECT_FRAC = (0.45, 0.60)
SUBJECT_JITTER = 16
SHAPE_FRAC = (0.08, 0.12)
SHAPE_MARGIN = (4, 12)
SHADE = 0.8
NOISE_SD = 20.0


def square_photo(path: str | Path, side: int) -> Image.Image:
    """The photo at ``path`` centre-cropped to a square and resized (bicubic) to ``side`` x ``side`` RGB."""
    im: Image.Image  # the opened file, then its RGB conversion
    with Image.open(path) as im:
        im = im.convert("RGB")
        w, h = im.size
        s = min(w, h)
        left, top = (w - s) // 2, (h - s) // 2
        return im.crop((left, top, left + s, top + s)).resize((side, side), Image.Resampling.BICUBIC)


def _background(kind: str, color: str | None, rng: random.Random, photo: str | None) -> Image.Image:
    if kind == "photo":
        assert photo is not None  # build_scene draws one for a photo background
        return square_photo(photo, CANVAS)
    assert color is not None  # build_scene draws one for the other backgrounds
    base = np.array(COLORS[color], dtype=np.float32)
    canvas = np.broadcast_to(base, (CANVAS, CANVAS, 3)).copy()
    yy, xx = np.mgrid[0:CANVAS, 0:CANVAS]
    if kind == "stripes":
        period = rng.choice((24, 32, 40))
        coord = xx if rng.random() < 0.5 else yy
        canvas[(coord % period) >= period // 2] = base * SHADE
    elif kind == "checkerboard":
        cell = rng.choice((28, 32, 56))
        canvas[((xx // cell) + (yy // cell)) % 2 == 1] = base * SHADE
    elif kind == "noise":
        g = np.random.default_rng(rng.getrandbits(32))
        canvas += g.normal(0.0, NOISE_SD, canvas.shape)
    return Image.fromarray(np.clip(np.rint(canvas), 0, 255).astype(np.uint8), "RGB")


def _anchor_box(anchor: str, size: int, margin: int) -> list[int]:
    lo, mid, hi = margin, (CANVAS - size) // 2, CANVAS - margin - size
    x = {"l": lo, "c": mid, "r": hi}[anchor[1]]
    y = {"t": lo, "c": mid, "b": hi}[anchor[0]]
    return [x, y, x + size, y + size]


ANCHORS = ("tl", "tr", "bl", "br", "tc", "bc", "cl", "cr")  # corners, then edge midpoints (row, column)


def _overlap(a: list[int], b: list[int], pad: int = 4) -> bool:
    return a[0] < b[2] + pad and b[0] < a[2] + pad and a[1] < b[3] + pad and b[1] < a[3] + pad


def draw_shape(draw: ImageDraw.ImageDraw, shape: str, color: str, bbox: list[int]) -> None:
    """Draw a filled ``shape`` of named ``color`` inside pixel box ``bbox`` (x1, y1 exclusive)."""
    x0, y0, x1, y1 = bbox
    fill = COLORS[color]
    if shape == "circle":
        draw.ellipse((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "square":
        draw.rectangle((x0, y0, x1 - 1, y1 - 1), fill=fill)
    elif shape == "triangle":
        draw.polygon([((x0 + x1 - 1) / 2, y0), (x1 - 1, y1 - 1), (x0, y1 - 1)], fill=fill)
    else:
        raise ValueError(f"unknown shape {shape!r}; accepted: {', '.join(SHAPES)}")


def build_scene(subject: dict[str, str], pool: list[dict[str, str]], rng: random.Random) -> tuple[Image.Image, dict]:
    """One scene: ``subject`` (an ImageNet row with ``path``) on a background drawn with ``rng``;
    ``pool`` (rows of the same split) supplies background photos. Returns (RGB image, scene meta)."""
    kind = rng.choices(list(BACKGROUNDS), weights=list(BACKGROUNDS.values()))[0]
    color, photo = None, None
    if kind == "photo":
        photo = rng.choice([r for r in pool if r["label"] != subject["label"]])
    else:
        color = rng.choice(list(COLORS) if kind == "flat" else list(TEXTURE_COLORS))
    image = _background(kind, color, rng, photo["path"] if photo else None)
    background = {"kind": kind, "color": color}
    if photo:
        background.update(file=photo["file"], wnid=photo["wnid"], label=photo["label"])

    side = round(rng.uniform(*SUBJECT_FRAC) * CANVAS)
    x0 = (CANVAS - side) // 2 + rng.randint(-SUBJECT_JITTER, SUBJECT_JITTER)
    y0 = (CANVAS - side) // 2 + rng.randint(-SUBJECT_JITTER, SUBJECT_JITTER)
    image.paste(square_photo(subject["path"], side), (x0, y0))
    sbox = [x0, y0, x0 + side, y0 + side]

    shapes: list[dict[str, Any]] = []
    draw = ImageDraw.Draw(image)
    anchors = rng.sample(ANCHORS, len(ANCHORS))
    for _ in range(rng.randint(0, 2)):
        size = round(rng.uniform(*SHAPE_FRAC) * CANVAS)
        margin = rng.randint(*SHAPE_MARGIN)
        combos = [(c, s) for c in COLORS for s in SHAPES
                  if c != color and (c, s) not in {(o["color"], o["shape"]) for o in shapes}]
        c, s = rng.choice(combos)
        while anchors:
            box = _anchor_box(anchors.pop(), size, margin)
            if not _overlap(box, sbox) and not any(_overlap(box, o["bbox"]) for o in shapes):
                draw_shape(draw, s, c, box)
                shapes.append({"shape": s, "color": c, "bbox": box})
                break
    meta = {"canvas": CANVAS,
            "subject": {"file": subject["file"], "wnid": subject["wnid"], "label": subject["label"], "bbox": sbox},
            "background": background, "shapes": shapes}
    return image, meta


def scene_questions(meta: dict, labels: list[str], rng: random.Random) -> list[tuple[str, str, str, str]]:
    """The questions of a scene as ``(question, answer, kind, qtype)``; ``labels``: the split's labels
    (negative subjects are drawn from them). See the module docstring for the list."""
    label = meta["subject"]["label"]
    bg = meta["background"]
    out = []
    taken = {label, bg.get("label")}
    neg = rng.choice(sorted({lab for lab in labels if lab not in taken}))
    out.append((object_question(label), "yes", "subject", "yes/no"))
    out.append((object_question(neg), "no", "subject", "yes/no"))
    if bg["kind"] != "photo":
        out.append(("What is in the image?", label, "subject", "what"))
        other = rng.choice([c for c in COLORS if c != bg["color"]])
        out.append(("What color is the background?", bg["color"], "background", "color"))
        out.append((f"Is the background {bg['color']}?", "yes", "background", "yes/no"))
        out.append((f"Is the background {other}?", "no", "background", "yes/no"))
    shapes = meta["shapes"]
    if shapes:
        present = {(o["color"], o["shape"]) for o in shapes}
        yes = rng.choice(shapes)
        out.append((f"Is there a small {yes['color']} {yes['shape']} at the edge of the image?", "yes",
                    "periphery", "yes/no"))
        base = rng.choice(shapes)
        if rng.random() < 0.5:
            combos = [(c, base["shape"]) for c in COLORS if (c, base["shape"]) not in present]
        else:
            combos = [(base["color"], s) for s in SHAPES if (base["color"], s) not in present]
        c, s = rng.choice(combos)
        out.append((f"Is there a small {c} {s} at the edge of the image?", "no", "periphery", "yes/no"))
    out.append(("How many small shapes are at the edges?", str(len(shapes)), "periphery", "count"))
    return out


def iter_scenes(split: str = "test", n: int | None = None, root: Path | None = None,
                seed: int = 0) -> Iterator[tuple[int, Image.Image, dict, list[tuple[str, str, str, str]]]]:
    """Yield ``(s, image, scene meta, questions)`` for the first ``n`` scenes of ``split`` (None: one per
    subject image: 200 for test, 800 for train).

    Raises:
        FileNotFoundError: the ImageNet sample is missing. ValueError: unknown split.
    """
    root = Path(root) if root is not None else default_data_root()
    rows = imagenet_split(root, split)
    labels = [r["label"] for r in rows]
    for s, subject in enumerate(rows[: len(rows) if n is None else n]):
        rng = random.Random(f"scenes:{split}:{seed}:{s}")
        image, meta = build_scene(subject, rows, rng)
        meta = {"scene": s, **meta}
        yield s, image, meta, scene_questions(meta, labels, rng)


def _samples(split: str, s: int, image, meta: dict, questions) -> list[Sample]:
    """The scene's questions as samples; "What is in the image?" is an open answer that must name the subject
    (its label or a WordNet synonym: ``scorer`` ``"names"``, :func:`vtprune.eval.scorer.score`)."""
    subject = meta["subject"]
    names = {"scorer": "names", "label": subject["label"], "wnid": subject["wnid"]}
    return [Sample(id=f"scenes/{split}/{s}/{q}", image=image, question=question, answer=answer, kind=kind,
                   meta=dict(meta, qtype=qtype, **(names if qtype == "what" else {})))
            for q, (question, answer, kind, qtype) in enumerate(questions)]


@register_dataset("scenes", splits=("test", "train"))
def load_scenes(split: str = "test", limit: int | None = None, root: Path | None = None,
                seed: int = 0) -> list[Sample]:
    """The scene questions of ``split`` with in-memory images (the questions of a scene share its image),
    building only as many scenes as ``limit`` questions need. Ids ``scenes/<split>/<scene>/<question>``."""
    out: list[Sample] = []
    for s, image, meta, questions in iter_scenes(split, None, root, seed):
        if limit is not None and len(out) >= limit:
            break
        out.extend(_samples(split, s, image, meta, questions))
    return out


def write_scenes(out_dir: str | Path, split: str = "test", n: int | None = None, root: Path | None = None,
                 seed: int = 0) -> Path:
    """Write the first ``n`` scenes of ``split`` as ``<out_dir>/<split>-<scene>.png`` plus
    ``<out_dir>/scenes-<split>.jsonl`` (one :func:`vtprune.eval.datasets.sample_row` per question) and
    return the JSONL path; ``load_jsonl(path, out_dir)`` reads the same samples back."""
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"scenes-{split}.jsonl"
    with open(path, "w") as f:
        for s, image, meta, questions in iter_scenes(split, n, root, seed):
            name = f"{split}-{s:04d}.png"
            image.save(out_dir / name)
            for sample in _samples(split, s, image, meta, questions):
                f.write(json.dumps(sample_row(sample, name)) + "\n")
    return path

