#!/usr/bin/env python
"""The recipe of vtprune's bundled model: LLaVA's two training stages at small scale, on a CPU.

Model (``vtprune.models.default``): the frozen EfficientNet-Lite0 tower -> LLaVA's 2-layer MLP projector
-> SmolLM2-135M-Instruct. Each of the 196 visual tokens (14 x 14 grid, 32 px) carries the tower's final
features (1280), its ImageNet class posterior (1000), a finer feature map pooled to the grid (stage 5
of the CNN, 112 channels at stride 16) and the token's 4 x 4 colour thumbnail (48): see
``EfficientNetLiteTowerConfig`` and ``default.TOWER_OPTIONS``.

Subcommands (each resumes where it stopped):

``features``  run the frozen tower once over every training / checking image and store its maps as
              float16 ``.npy`` files under ``--cache`` (never in the repository): ImageNet train split
              (800 photos x 3 views: as is, mirrored, a random resized crop), scenes train split (800
              subjects x 2 scene seeds), easy-VQA train (first 1000 image ids), and the held-out checks
              (ImageNet test split 200, scenes test 200, easy-VQA test first 300 image ids).
``train --stage 1``  LLaVA stage 1: only the projector trains (tower and LM frozen), from the
              "posterior -> expected label word embedding" init.
``train --stage 2``  LLaVA stage 2: the projector and a LoRA adapter (rank 8) on all seven linear
              projections of every LM layer (peft), from stage 1's projector (``--init``), or from
              exported weights (``--init-weights``: a warm start, e.g. from the bundled model, checked
              to give the exported model's loss at step 0).
``export``    fold the input standardisation into the projector and write it and the adapter
              (bfloat16 weights) into ``vtprune/models/weights/``.
``plot``      the loss curves of both stages as a PNG.

Both training stages run held-out checks on the precomputed check sets (``--check-every``): the greedy
first answer token per question kind, and a few greedy answers to the open questions scored as the final
evaluation scores them (``scripts/eval_default_model.py`` measures the adopted model on real images).

Training data: ImageNet yes/no questions (negatives: random, POPE-popular and WordNet-sibling labels,
all from the 800 training classes) and "What is in the image?" -> label; scenes conversations (one
question on each of subject, background and periphery, in random order, or "Describe the image." alone
-> a templated caption, ``vtprune.eval.datasets.scene_captions.caption_for``); easy-VQA questions (alone, or one
colour and one shape question as a conversation); category questions on the ImageNet training photos
("Is there an animal / a dog / food ...?", the categories of ``imagenet-category``, a fifth ``--mix``
weight).

Input scales: the standardised feature, finer and colour channels each get their own scale
(:data:`DEFAULT_SCALES`, ``--finer-scale`` / ``--color-scale``; see the comment at :data:`INPUT_SCALE`
for why the scale, not the learning rate, decides how far AdamW moves a zero-initialised column);
``export`` folds the run's scales into linear_1 with the standardisation.

Training is neutral to pruning: every training forward sees all 196 visual tokens, no token dropout.
Loss: cross-entropy on the answer tokens and the closing ``<|im_end|>`` only. bf16 autocast where the
CPU has native bf16 (``vtprune.inputs.cpu_has_bf16``: AMX / AVX512-BF16), else fp32 (recorded in the
history's ``precision``), AdamW, linear warm-up then cosine decay; a checkpoint (trainable weights, optimizer, step, RNG)
every ``--save-every`` steps, from which a rerun of the same command resumes.

Held-out: no training image is used by any evaluation. ImageNet: the fixed 800 / 200 split of
``vtprune.eval.datasets.split_imagenet`` (seed 0); training questions name only the 800 training
classes. Scenes: ``train`` split (its subjects and background photos are the 800 training photos) vs
``test``. easy-VQA: its train vs test split.

Reconstructed for this project (the stages follow LLaVA, Liu et al., NeurIPS 2023, and LLaVA-1.5's LoRA
variant; data, sizes and schedule are ours). Usage: see ``vtprune/models/weights/RECORD.md``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import random
import sys
import time
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vtprune.eval.datasets import default_data_root, imagenet_rows, imagenet_split  # noqa: E402
from vtprune.models import default as D  # noqa: E402

DEFAULT_CACHE = Path(os.environ.get("VTPRUNE_RECIPE_CACHE") or D.cache_root() / "recipe-v1")
VIEWS = 3
SCENE_SEEDS = (0, 1)
EASYVQA_TRAIN_IMAGES = 1000
EASYVQA_CHECK_IMAGES = 300


# ------------------------------------------------------------------------------------------- features

def _view(image, view: int, rng: random.Random):
    """View ``view`` of a training photo: 0 as is, 1 mirrored, 2 a random resized crop (area 50-100 %,
    aspect 3/4-4/3), mirrored with probability 1/2."""
    from PIL import Image

    if view == 0:
        return image
    if view == 1:
        return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
    w, h = image.size
    for _ in range(10):
        area = rng.uniform(0.5, 1.0) * w * h
        ratio = math.exp(rng.uniform(math.log(3 / 4), math.log(4 / 3)))
        cw, ch = int(round(math.sqrt(area * ratio))), int(round(math.sqrt(area / ratio)))
        if cw <= w and ch <= h:
            x, y = rng.randint(0, w - cw), rng.randint(0, h - ch)
            image = image.crop((x, y, x + cw, y + ch))
            break
    return image.transpose(Image.Transpose.FLIP_LEFT_RIGHT) if rng.random() < 0.5 else image


def feature_sets(data: Path) -> list[tuple[str, callable]]:
    """(name, builder) of every feature set, checks first; a builder returns (images, meta rows)."""
    from vtprune.eval.datasets.scene_captions import caption_for
    from vtprune.eval.datasets.scenes import iter_scenes

    def imagenet(split, view):
        def build():
            from PIL import Image

            rows = imagenet_split(data, split)
            images, metas = [], []
            for r in rows:
                rng = random.Random(f"view:{r['file']}:{view}")
                with Image.open(r["path"]) as im:
                    images.append(_view(im.convert("RGB"), view, rng))
                metas.append({"file": r["file"], "wnid": r["wnid"], "label": r["label"]})
            return images, metas
        return build

    def scenes(split, seed):
        def build():
            images, metas = [], []
            for _s, image, meta, questions in iter_scenes(split, root=data, seed=seed):
                images.append(image)
                metas.append({**meta, "questions": questions, "caption": caption_for(meta)})
            return images, metas
        return build

    def easyvqa(split, n):
        def build():
            import easy_vqa
            from PIL import Image

            paths = easy_vqa.get_train_image_paths() if split == "train" else easy_vqa.get_test_image_paths()
            ids = sorted(paths)[:n]
            images = []
            for i in ids:
                with Image.open(paths[i]) as im:
                    images.append(im.convert("RGB"))
            return images, [{"image_id": i} for i in ids]
        return build

    sets = [("imagenet-test", imagenet("test", 0)), ("scenes-test", scenes("test", 0)),
            ("easyvqa-test", easyvqa("test", EASYVQA_CHECK_IMAGES)),
            ("imagenet-train-v0", imagenet("train", 0)), ("scenes-train-s0", scenes("train", 0)),
            ("easyvqa-train", easyvqa("train", EASYVQA_TRAIN_IMAGES))]
    sets += [(f"imagenet-train-v{v}", imagenet("train", v)) for v in range(1, VIEWS)]
    sets += [(f"scenes-train-s{s}", scenes("train", s)) for s in SCENE_SEEDS[1:]]
    return sets


@torch.no_grad()
def cmd_features(args):
    """Write ``<cache>/<set>.{feats,finer,color}.npy`` (float16, ``[N, 196, C]``) and ``<set>.json``."""
    from vtprune.models.efficientnet_tower import EfficientNetLiteTower, EfficientNetLiteTowerConfig

    torch.set_num_threads(args.threads)
    cache = Path(args.cache)
    cache.mkdir(parents=True, exist_ok=True)
    tower = EfficientNetLiteTower.from_imagenet(EfficientNetLiteTowerConfig(**D.TOWER_OPTIONS))
    ip = D.build_image_processor()
    for name, build in feature_sets(Path(args.data)):
        if (cache / f"{name}.json").is_file():
            print(f"{name}: done", flush=True)
            continue
        t0 = time.time()
        images, metas = build()
        n = len(images)
        outs = {k: np.lib.format.open_memmap(cache / f"{name}.{k}.npy.partial", mode="w+", dtype=np.float16,
                                             shape=(n, D.NUM_IMAGE_TOKENS, c))
                for k, c in (("feats", 1280), ("finer", 112), ("color", 48))}
        for i in range(0, n, args.batch):
            px = ip(images=images[i : i + args.batch], return_tensors="pt")["pixel_values"]
            feats, _, finer, color = tower.feature_maps(px)
            for k, m in (("feats", feats), ("finer", finer), ("color", color)):
                outs[k][i : i + len(px)] = m.flatten(2).transpose(1, 2).to(torch.float16).numpy()
            if (i // args.batch) % 25 == 0:
                print(f"{name}: {i + len(px)}/{n} images, {time.time() - t0:.0f}s", flush=True)
        for k, m in outs.items():
            m.flush()
            del m
            os.replace(cache / f"{name}.{k}.npy.partial", cache / f"{name}.{k}.npy")
        (cache / f"{name}.json").write_text(json.dumps(metas))
        print(f"{name}: {n} images in {time.time() - t0:.0f}s", flush=True)


# --------------------------------------------------------------------------------------------- data

FEATURE_PARTS = (("feats", 1280), ("finer", 112), ("color", 48))
YES, NO = "Yes", "No"
# The standardised channels are also scaled, per group, before linear_1. With AdamW each weight moves by
# about lr per step whatever its gradient's scale, so for columns that start at zero the input scale IS
# the effective learning rate: one step moves a projected token's coordinate by up to lr * sum_c |x_c|
# (|x_c| ~ 0.8 * scale for standardised channels). The 1280 feature channels keep 1 / sqrt(1440) (the
# first recipe's value: sum |x| ~ 27, so they grow beside the label-embedding channel, entries ~0.1,
# token norm ~2-3, instead of swamping it). The first recipe gave the 48 colour and 112 finer channels
# the same 1 / sqrt(1440): sum |x| ~ 1.0 and ~2.4, so at lr 1e-4 over 400 steps the colour columns could
# move a coordinate by 0.04 at most, and the bundled model never learnt colour (RECORD.md). Default
# scales now give each group about the feature group's sum |x| or more: finer 0.3 (112 * 0.8 * 0.3 ~ 27),
# colour 1.0 (48 * 0.8 ~ 38): a coordinate can move by O(0.1-1) over a few hundred steps.
INPUT_SCALE = 1 / math.sqrt(1440)
DEFAULT_SCALES = {"feats": INPUT_SCALE, "finer": 0.3, "color": 1.0}
# Each group's columns of the projector's input (Trainer.inputs): features, the 1,000-class posterior, finer, colour
INPUT_COLUMNS = {"feats": slice(0, 1280), "finer": slice(2280, 2392), "color": slice(2392, 2440)}


def input_scales(train_args: dict) -> dict[str, float]:
    """The per-group input scales a run trained with (its ``args``); runs from before the per-group
    scales (no ``finer_scale`` / ``color_scale``) used :data:`INPUT_SCALE` for every group."""
    return {"feats": INPUT_SCALE, "finer": float(train_args.get("finer_scale", INPUT_SCALE)),
            "color": float(train_args.get("color_scale", INPUT_SCALE))}


def _column_affine(stats: dict, scales: dict[str, float]) -> tuple[torch.Tensor, torch.Tensor]:
    """``(mean [2440], factor [2440])`` such that the projector's input is ``(raw - mean) * factor``:
    ``scale / std`` per standardised channel, 1 (and mean 0) on the 1000 posterior channels."""
    n_post = 1000
    mean = torch.cat([stats["feats"][0], torch.zeros(n_post), stats["finer"][0], stats["color"][0]])
    factor = torch.cat([scales["feats"] / stats["feats"][1], torch.ones(n_post),
                        scales["finer"] / stats["finer"][1], scales["color"] / stats["color"][1]])
    return mean.float(), factor.float()


def fold_projector(proj: dict[str, torch.Tensor], stats: dict, scales: dict[str, float]) -> dict[str, torch.Tensor]:
    """The projector state on raw channels: linear_1 ``W x + b`` with ``x = (raw - mean) * factor``
    becomes ``(W * factor) raw + (b - (W * factor) mean)`` (what ``export`` writes; linear_2 unchanged)."""
    mean, factor = _column_affine(stats, scales)
    out = {k: v.clone().float() for k, v in proj.items()}
    w = out["linear_1.weight"] * factor
    out["linear_1.bias"] = out["linear_1.bias"] - w @ mean
    out["linear_1.weight"] = w
    return out


def unfold_projector(folded: dict[str, torch.Tensor], stats: dict, scales: dict[str, float]) -> dict[str, torch.Tensor]:
    """Inverse of :func:`fold_projector`: the projector state on standardised, scaled channels that
    computes the same function as ``folded`` on raw channels (any ``stats`` and ``scales``)."""
    mean, factor = _column_affine(stats, scales)
    out = {k: v.clone().float() for k, v in folded.items()}
    w = out["linear_1.weight"]
    out["linear_1.bias"] = out["linear_1.bias"] + w @ mean
    out["linear_1.weight"] = w / factor
    return out
LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


class Store:
    """The precomputed maps of the feature sets (memory-mapped) and their meta rows."""

    def __init__(self, cache: Path, names: list[str]):
        self.cache = Path(cache)
        self.arrays, self.meta = {}, {}
        for name in names:
            if not (self.cache / f"{name}.json").is_file():
                raise FileNotFoundError(f"feature set {name} missing in {cache}: run `features` first")
            self.meta[name] = json.loads((self.cache / f"{name}.json").read_text())
            self.arrays[name] = {k: np.load(self.cache / f"{name}.{k}.npy", mmap_mode="r") for k, _ in FEATURE_PARTS}

    def maps(self, keys: list[tuple[str, int]]) -> dict[str, torch.Tensor]:
        """``{"feats": [B, 196, 1280], "finer": [B, 196, 112], "color": [B, 196, 48]}`` float32."""
        return {k: torch.from_numpy(np.stack([self.arrays[n][k][i] for n, i in keys]).astype(np.float32))
                for k, _ in FEATURE_PARTS}


def channel_stats(store: Store, names: list[str], per_set: int = 200) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Per-channel mean and std of each map over the first ``per_set`` images of each set (training sets
    only): the projector trains on standardised inputs, and ``export`` folds the standardisation in."""
    out = {}
    for k, _ in FEATURE_PARTS:
        x = torch.cat([torch.from_numpy(store.arrays[n][k][:per_set].astype(np.float32)).reshape(-1, store.arrays[n][k].shape[-1])
                       for n in names])
        out[k] = (x.mean(0), x.std(0).clamp(min=1e-3))
    return out


class Tasks:
    """Draws training questions (set, image index, question, answer) from the training sets."""

    def __init__(self, store: Store, mix: dict[str, float], rng: random.Random, caption_frac: float = 0.2,
                 single_turn: bool = False, easyvqa_single: float = 0.5, prefer: tuple[str, ...] = ()):
        from vtprune.eval.datasets.base import object_question
        from vtprune.eval.datasets.imagenet_category import EXCLUDED_CLASSES, category_answers
        from vtprune.eval.datasets.imagenet_pope import POPULAR
        from vtprune.eval.wordnet import load_hierarchy

        self.rng, self.mix, self.caption_frac, self.single_turn = rng, mix, caption_frac, single_turn
        self.easyvqa_single = easyvqa_single
        self.prefer = set(prefer)  # question tags drawn first wherever a scene part / easy-VQA image has one
        self.q = object_question
        self.in_sets = [n for n in store.meta if n.startswith("imagenet-train")]
        self.sc_sets = [n for n in store.meta if n.startswith("scenes-train")]
        rows = store.meta[self.in_sets[0]]
        self.in_rows = rows
        train_wnids = sorted({r["wnid"] for r in rows})
        label_of = {r["wnid"]: r["label"] for r in rows}
        # popular negatives: POPE's popular objects as ImageNet classes, only those of the training split
        self.popular = [lab for _, w, lab in POPULAR if w in label_of]
        hier = load_hierarchy()
        self.siblings = {}
        for w in train_wnids:
            found = hier.nearest_siblings(w, train_wnids)
            labs = [label_of[o] for o in (found[2] if found else []) if label_of[o] != label_of[w]]
            self.siblings[w] = labs
        self.labels = [r["label"] for r in rows]
        # category questions (imagenet-category's categories and answers, on the training photos): per
        # photo, its "yes" and "no" categories at each level
        self.categories = []
        for i, r in enumerate(rows):
            if r["wnid"] in EXCLUDED_CLASSES:
                continue
            ans = category_answers(hier, r["wnid"])
            self.categories.append((i, ans["yes"], ans["no"]))
        self.category_yes = [c for c in self.categories if c[1]]
        self.ev = []
        if "easyvqa-train" in store.meta:
            import easy_vqa

            have = {m["image_id"]: j for j, m in enumerate(store.meta["easyvqa-train"])}
            self.ev_by_image: dict = {}
            for q, a, iid in zip(*easy_vqa.get_train_questions(), strict=True):
                if iid in have:
                    key = ("easyvqa-train", have[iid])
                    self.ev.append((key, q, answer_text(a)))
                    self.ev_by_image.setdefault(key, {}).setdefault(_easyvqa_reveals(q, a), []).append((q, answer_text(a)))
        self.store = store

    def imagenet_yes_no(self):
        r = self.rng
        i = r.randrange(len(self.in_rows))
        key = (r.choice(self.in_sets), i)
        row = self.in_rows[i]
        if r.random() < 0.5:
            return key, self.q(row["label"]), YES, "in-yes/no", []
        kind = r.choice(("random", "popular", "adversarial"))
        pool = {"random": self.labels, "popular": self.popular, "adversarial": self.siblings[row["wnid"]]}[kind]
        pool = [lab for lab in pool if lab != row["label"]] or [lab for lab in self.labels if lab != row["label"]]
        return key, self.q(r.choice(pool)), NO, "in-yes/no", []

    def category(self):
        """ "Is there {a category} in the image?" (:mod:`vtprune.eval.datasets.imagenet_category`): half
        the time a photo with a category above its class and one of those ("Yes"), else any photo and a
        category of the same level not above it ("No")."""
        from vtprune.eval.datasets.imagenet_category import category_question

        r = self.rng
        if r.random() < 0.5:
            i, yes, _ = r.choice(self.category_yes)
            c, answer = r.choice(yes), YES
        else:
            i, yes, no = r.choice(self.categories)
            level = r.choice(sorted({c.level for c in yes})) if yes else r.choice(sorted({c.level for c in no}))
            c, answer = r.choice([c for c in no if c.level == level]), NO
        return (r.choice(self.in_sets), i), category_question(c), answer, f"in-category:{c.level}", []

    def imagenet_what(self):
        i = self.rng.randrange(len(self.in_rows))
        label = self.in_rows[i]["label"]
        return (self.rng.choice(self.in_sets), i), "What is in the image?", named(label), "in-what", []

    def scene(self):
        """A scene conversation: with probability ``caption_frac`` "Describe the image." alone, else one
        question on each of the scene's parts (subject, background, periphery) in random order, so no
        answer can be read off an earlier turn (LLaVA's multi-turn conversations, which let one image's
        196 tokens serve several questions)."""
        r = self.rng
        name = r.choice(self.sc_sets)
        i = r.randrange(len(self.store.meta[name]))
        meta = self.store.meta[name][i]
        if r.random() < self.caption_frac:
            return (name, i), "Describe the image.", meta["caption"], "sc-caption", []
        questions = [(q, named(a) if qtype == "what" else answer_text(a), kind, qtype)
                     for q, a, kind, qtype in meta["questions"]]
        if self.single_turn:  # one random question of the scene (stage 1)
            q, a, kind, qtype = r.choice(questions)
            return (name, i), q, a, f"sc-{kind}-{qtype}", []
        by_part: dict[str, list] = {}
        for q, a, kind, qtype in questions:
            by_part.setdefault(kind, []).append((q, a, f"sc-{kind}-{qtype}"))
        turns = [r.choice([t for t in v if t[2] in self.prefer] or v) for v in by_part.values()]
        r.shuffle(turns)
        (q, a, tag), more = turns[0], turns[1:]
        return (name, i), q, a, tag, more

    def easyvqa(self):
        """An easy-VQA conversation: half the time one question, else one question that reveals only
        the colour and one that reveals only the shape, in random order (see :func:`_easyvqa_reveals`)."""
        r = self.rng
        key, q, a = r.choice(self.ev)
        if "ev-color" in self.prefer and self.ev_by_image[key].get("color"):
            q, a = r.choice(self.ev_by_image[key]["color"])
        if self.single_turn or r.random() < self.easyvqa_single:
            return key, q, a, "ev", []
        groups = self.ev_by_image[key]
        if not groups.get("color") or not groups.get("shape"):
            return key, q, a, "ev", []
        turns = [(*r.choice(groups["color"]), "ev"), (*r.choice(groups["shape"]), "ev")]
        r.shuffle(turns)
        (q, a, tag), more = turns[0], turns[1:]
        return key, q, a, tag, more

    def sample(self):
        kinds = [k for k, w in self.mix.items() if w > 0]
        k = self.rng.choices(kinds, weights=[self.mix[k] for k in kinds])[0]
        return {"in-yes/no": self.imagenet_yes_no, "in-what": self.imagenet_what, "scenes": self.scene,
                "easyvqa": self.easyvqa, "category": self.category}[k]()


_EV_COLORS = {"red", "green", "blue", "black", "gray", "yellow", "teal", "brown"}
_EV_SHAPES = {"circle", "rectangle", "triangle"}


def _easyvqa_reveals(q: str, a: str) -> str:
    """"color" / "shape" / "both": what an easy-VQA question (with its answer) tells about the image."""
    import re

    words = set(re.findall(r"[a-z]+", q.lower())) | {a.lower()}
    color, shape = bool(words & _EV_COLORS), bool(words & _EV_SHAPES)
    return "both" if color == shape else ("color" if color else "shape")


def answer_text(a: str) -> str:
    """The trained form of a reference answer: "Yes" / "No" capitalised, everything else as given."""
    return {"yes": YES, "no": NO}.get(a, a)


def named(label: str) -> str:
    """The trained answer to "What is in the image?": "A golden retriever." (one short sentence). With
    the article the label's words are the space-prefixed tokens whose mean embedding the posterior
    channel of the visual tokens carries, so naming an unseen class is a copy; ``vtprune eval``'s
    normalisation drops the article and the full stop, leaving the label."""
    return f"{'An' if label[:1].lower() in 'aeiou' else 'A'} {label}."


class Encoder:
    """Token ids of prompts (ChatML, the bundled :data:`vtprune.models.default.CHAT_TEMPLATE`) and answers."""

    def __init__(self, processor):
        self.p, self.tok, self.cache = processor, processor.tokenizer, {}
        self.end = self.tok.convert_tokens_to_ids(D.END_OF_TURN)

    def prompt(self, q: str) -> list[int]:
        if q not in self.cache:
            msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
            text = self.p.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
            text = text.replace(D.IMAGE_TOKEN, D.IMAGE_TOKEN * D.NUM_IMAGE_TOKENS)
            self.cache[q] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self.cache[q]

    def answer(self, a: str) -> list[int]:
        return self.tok(a, add_special_tokens=False)["input_ids"] + [self.end]

    def next_turn(self, q: str) -> list[int]:
        """A later user turn after an answer's ``<|im_end|>``: ``\\n<|im_start|>user\\n{q}<|im_end|>\\n
        <|im_start|>assistant\\n``, as the chat template renders a conversation."""
        key = ("next", q)
        if key not in self.cache:
            self.cache[key] = self.tok(f"\n<|im_start|>user\n{q}{D.END_OF_TURN}\n<|im_start|>assistant\n",
                                       add_special_tokens=False)["input_ids"]
        return self.cache[key]


def batch_ids(enc: Encoder, items, with_answers: bool = True):
    """Right-padded ``ids`` / ``attention`` [B, S] and the answer targets: one list per turn of
    ``(row, position predicting the token, token)``, with the turn's task tag.

    An item is ``(key, question, answer, tag[, later turns [(question, answer, tag)]])``; the later turns
    follow as a conversation. Without answers only the first question's prompt is built."""
    seqs, turns = [], []
    for b, item in enumerate(items):
        _, q, a, tag = item[:4]
        more = item[4] if len(item) > 4 else []
        seq = list(enc.prompt(q))
        if with_answers:
            for j, (qq, aa, tt) in enumerate([(q, a, tag), *more]):
                if j:
                    seq += enc.next_turn(qq)
                ans = enc.answer(aa)
                turns.append(([(b, len(seq) - 1 + k, t) for k, t in enumerate(ans)], tt))
                seq += ans
        seqs.append(seq)
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), enc.end, dtype=torch.long)
    att = torch.zeros((len(seqs), n), dtype=torch.long)
    for i, s in enumerate(seqs):
        ids[i, : len(s)] = torch.tensor(s)
        att[i, : len(s)] = 1
    return ids, att, turns


class Trainer:
    """The model pieces the recipe trains: the projector (on standardised tower maps) and, in stage 2,
    the LM's LoRA adapter."""

    def __init__(self, args, store: Store, lora: bool):
        self.model, self.processor = D.assemble(None, None)
        for p in self.model.parameters():
            p.requires_grad_(False)
        self.enc = Encoder(self.processor)
        self.tower = self.model.model.vision_tower
        self.proj = self.model.model.multi_modal_projector
        self.lm = self.model.model.language_model
        self.embed = self.lm.embed_tokens
        self.image_id = self.model.config.image_token_id
        cache = Path(args.cache)
        stats_path = cache / "channel-stats.pt"
        if not stats_path.is_file():
            torch.save(channel_stats(Store(cache, STATS_SETS), STATS_SETS), stats_path)
        self.stats = torch.load(stats_path)
        self.scales = input_scales(vars(args))
        # bf16 autocast only where the CPU has native bf16 (AMX / AVX512-BF16): on an AVX2-only CPU bf16
        # matmuls emulate at ~1/90 of fp32's speed, so training runs in fp32 there
        from vtprune.inputs import cpu_has_bf16

        self.autocast = cpu_has_bf16()
        self.peft = None
        if lora:
            from peft import LoraConfig, get_peft_model

            cfg = LoraConfig(r=args.lora_rank, lora_alpha=args.lora_alpha, lora_dropout=args.lora_dropout,
                             target_modules=r".*language_model.*\.(" + "|".join(LORA_TARGETS) + ")", bias="none")
            self.peft = get_peft_model(self.model, cfg)
        # linear_1 trains (its feature, finer and colour columns, and its bias); linear_2 stays the
        # identity of the init: its input is GELU(z) ~ z ~ +5 in every unit (the offset), so an AdamW
        # step of lr on its 576 x 576 weights moves a token by ~lr * 5 * 576 (the first recipe's stage 1
        # blew the tokens up to norm ~560 that way, drowning the label channel's ~2.4)
        for p in self.proj.linear_1.parameters():
            p.requires_grad_(True)
        # the posterior columns keep the label-embedding init (held-out classes get the same channel)
        n_feat = 1280
        mask = torch.ones_like(self.proj.linear_1.weight)
        mask[:, n_feat : n_feat + 1000] = 0.0
        self.proj.linear_1.weight.register_hook(lambda g: g * mask)

    def classifier_init(self, class_names: list[str], offset: float = 5.0):
        """Projector = "posterior -> expected label word embedding" (as the previous bundled projector):
        linear_1 = [0 | L^T | 0 | 0] + offset, linear_2 = I - offset, L[k] = mean input embedding of the
        tokens of " {name of class k}"; GELU(z) = z to 1e-6 at z ~ offset."""
        tok = self.processor.tokenizer
        with torch.no_grad():
            E = self.embed.weight
            L = torch.stack([E[tok(" " + n, add_special_tokens=False)["input_ids"]].mean(0) for n in class_names])
            w1 = torch.zeros_like(self.proj.linear_1.weight)
            w1[:, 1280:2280] = L.T
            self.proj.linear_1.weight.copy_(w1)
            self.proj.linear_1.bias.fill_(offset)
            self.proj.linear_2.weight.copy_(torch.eye(self.proj.linear_2.out_features))
            self.proj.linear_2.bias.fill_(-offset)

    def amp(self):
        """The autocast context of every LM forward: bf16 on a CPU with native bf16, else off (fp32)."""
        return torch.autocast("cpu", dtype=torch.bfloat16, enabled=self.autocast)

    def inputs(self, maps: dict[str, torch.Tensor]) -> torch.Tensor:
        """The projector's input ``[B, 196, 2440]``: the standardised features, the class posterior (from
        the raw features), the standardised finer and colour channels, each group times its input scale
        (:data:`DEFAULT_SCALES`, ``--finer-scale`` / ``--color-scale``)."""
        from vtprune.models.efficientnet_tower import class_posterior

        post = class_posterior(self.tower, maps["feats"])
        norm = {k: self.scales[k] * (maps[k] - self.stats[k][0]) / self.stats[k][1] for k, _ in FEATURE_PARTS}
        return torch.cat([norm["feats"], post, norm["finer"], norm["color"]], dim=-1)

    def visual(self, maps: dict[str, torch.Tensor]) -> torch.Tensor:
        """Projected visual tokens ``[B, 196, 576]`` (float32) from raw maps (:meth:`inputs`)."""
        return self.proj(self.inputs(maps))

    def group_norms(self, x: torch.Tensor) -> dict[str, float]:
        """Mean norm over tokens of each input group's part of linear_1's output (``W_g x_g``): how far
        the finer and colour columns move a token (linear_2 is the identity of the init)."""
        w = self.proj.linear_1.weight.detach()
        return {g: round(float((x[..., c].detach() @ w[:, c].T).norm(dim=-1).mean()), 4)
                for g, c in INPUT_COLUMNS.items()}

    def hidden(self, ids, att, maps, lm=None, img=None):
        """The LM's last hidden states ``[B, S, 576]``; ``lm`` / ``img`` (projected tokens) replace this
        trainer's LM and projector (the warm start's check against the bundled model)."""
        emb = self.embed(ids).float()
        if img is None:
            x = self.inputs(maps)
            img = self.proj(x)
            self.last_inputs = x
        self.visual_norm = float(img.detach().norm(dim=-1).mean())
        mask = (ids == self.image_id).unsqueeze(-1).expand_as(emb)
        emb = emb.masked_scatter(mask, img.reshape(-1, img.shape[-1]))
        with self.amp():
            return (lm or self.lm)(inputs_embeds=emb, attention_mask=att, use_cache=False).last_hidden_state

    def loss(self, items, maps, lm=None, img=None):
        """Mean over the batch's answers (turns) of each answer's mean cross-entropy over its tokens and
        its closing ``<|im_end|>``; also ``[(task tag, that answer's loss)]``. ``lm`` / ``img``: as
        :meth:`hidden`."""
        ids, att, turns = batch_ids(self.enc, items)
        h = self.hidden(ids, att, maps, lm, img)
        flat = [(b, p, t, j) for j, (toks, _) in enumerate(turns) for b, p, t in toks]
        rows, pos, tgt, turn = (list(x) for x in zip(*flat, strict=True))
        with self.amp():
            logits = h[rows, pos] @ self.embed.weight.T
        per_tok = torch.nn.functional.cross_entropy(logits.float(), torch.tensor(tgt), reduction="none")
        turn = torch.tensor(turn)
        per_turn = torch.zeros(len(turns)).index_add_(0, turn, per_tok) / torch.bincount(turn, minlength=len(turns))
        return per_turn.mean(), [(tag, float(v)) for (_, tag), v in zip(turns, per_turn.detach(), strict=True)]

    @torch.no_grad()
    def first_token(self, items, maps):
        """Greedy first answer token of each item (teacher-forced prompt), and logit(Yes) - logit(No)."""
        ids, att, _ = batch_ids(self.enc, items, with_answers=False)
        h = self.hidden(ids, att, maps)
        last = att.sum(1) - 1
        logits = (h[torch.arange(len(items)), last] @ self.embed.weight.T).float()
        yes, no = self.enc.answer(YES)[0], self.enc.answer(NO)[0]
        return logits.argmax(-1), logits[:, yes] - logits[:, no]

    @torch.no_grad()
    def generate(self, items, maps, max_new_tokens: int = 32) -> list[str]:
        """Greedy answers (until ``<|im_end|>``) through the training forward, one row at a time."""
        out = []
        for b, item in enumerate(items):
            ids, att, _ = batch_ids(self.enc, [item], with_answers=False)
            one = {k: v[b : b + 1] for k, v in maps.items()}
            emb = self.embed(ids).float()
            img = self.visual(one)
            emb = emb.masked_scatter((ids == self.image_id).unsqueeze(-1).expand_as(emb), img.reshape(-1, 576))
            past, toks = None, []
            for _ in range(max_new_tokens):
                with self.amp():
                    o = self.lm(inputs_embeds=emb, past_key_values=past, use_cache=True)
                past = o.past_key_values
                t = int((o.last_hidden_state[0, -1] @ self.embed.weight.T).argmax())
                if t == self.enc.end:
                    break
                toks.append(t)
                emb = self.embed(torch.tensor([[t]])).float()
            out.append(self.processor.tokenizer.decode(toks))
        return out

    def load_bundled(self, weights_dir: Path) -> None:
        """Warm start from exported weights (``projector.safetensors`` with the standardisation folded in,
        ``lora/``): the projector is unfolded with this run's channel statistics and input scales
        (:func:`unfold_projector`, the same function on raw channels), the LoRA tensors are loaded into
        the peft model. Raises ValueError when the adapter's rank / alpha differ from this run's or a
        tensor does not fit."""
        from safetensors.torch import load_file

        weights_dir = Path(weights_dir)
        folded = {k: v.float() for k, v in load_file(str(weights_dir / "projector.safetensors")).items()}
        self.proj.load_state_dict(unfold_projector(folded, self.stats, self.scales))
        if self.peft is None:
            return
        from peft import set_peft_model_state_dict

        cfg = json.loads((weights_dir / "lora" / "adapter_config.json").read_text())
        mine = self.peft.peft_config["default"]
        if (cfg["r"], float(cfg["lora_alpha"])) != (mine.r, float(mine.lora_alpha)):
            raise ValueError(f"{weights_dir / 'lora'} has rank {cfg['r']} / alpha {cfg['lora_alpha']}, this run "
                             f"{mine.r} / {mine.lora_alpha}: pass the same --lora-rank / --lora-alpha")
        lora = {k: v.float() for k, v in load_file(str(weights_dir / "lora" / "adapter_model.safetensors")).items()}
        res = set_peft_model_state_dict(self.peft, lora)
        n_lora = sum(1 for n, _ in self.peft.named_parameters() if "lora_" in n)
        if res.unexpected_keys or len(lora) != n_lora:
            raise ValueError(f"{weights_dir / 'lora'}: {len(lora)} tensors for {n_lora} LoRA parameters, "
                             f"unexpected: {list(res.unexpected_keys)[:4]}")

    @torch.no_grad()
    def bundled_loss(self, weights_dir: Path, items, maps) -> float:
        """The loss of the exported model in ``weights_dir`` on ``items``, as the package assembles it
        (``vtprune.models.default.assemble``: folded projector on the raw channels, LoRA merged), through
        this trainer's forward: equal to this trainer's loss after :meth:`load_bundled`."""
        from vtprune.models.efficientnet_tower import class_posterior

        weights_dir = Path(weights_dir)
        model, _ = D.assemble(weights_dir / "projector.safetensors", weights_dir / "lora")
        raw = torch.cat([maps["feats"], class_posterior(self.tower, maps["feats"]), maps["finer"], maps["color"]], -1)
        img = model.model.multi_modal_projector(raw)
        return float(self.loss(items, maps, lm=model.model.language_model, img=img)[0])

    def trainable(self):
        lora = [p for n, p in self.model.named_parameters() if p.requires_grad and "lora_" in n]
        return [p for p in self.proj.parameters() if p.requires_grad], lora

    def state(self):
        st = {"proj": {k: v.detach().clone() for k, v in self.proj.state_dict().items()}}
        if self.peft is not None:
            from peft import get_peft_model_state_dict

            st["lora"] = {k: v.detach().clone() for k, v in get_peft_model_state_dict(self.peft).items()}
        return st

    def load_state(self, st):
        self.proj.load_state_dict(st["proj"])
        if self.peft is not None and "lora" in st:
            from peft import set_peft_model_state_dict

            set_peft_model_state_dict(self.peft, st["lora"])


# ---------------------------------------------------------------------------------------------- checks

def check_items(store: Store, per_kind: int, seed: int = 0) -> dict[str, list]:
    """Held-out questions on the precomputed check sets, ``per_kind`` of each kind:
    imagenet-pope (test split) per setting, "What is in the image?" on the test photos, the scenes test
    split per (kind, qtype) and captions, easy-VQA test per kind."""
    from vtprune.eval.datasets.easy_vqa import easy_vqa_kind
    from vtprune.eval.datasets.imagenet_pope import load_imagenet_pope

    out: dict[str, list] = {}
    idx = {m["file"]: i for i, m in enumerate(store.meta["imagenet-test"])}
    for s in load_imagenet_pope("test", seed=seed):
        lst = out.setdefault(f"in-{s.kind}", [])
        if len(lst) < per_kind:
            lst.append((("imagenet-test", idx[s.meta["file"]]), s.question, answer_text(s.answer), s.meta))
    out["in-what"] = [(("imagenet-test", i), "What is in the image?", named(m["label"]), m)
                      for i, m in enumerate(store.meta["imagenet-test"][:per_kind])]
    from vtprune.eval.datasets.imagenet_category import load_imagenet_category

    for s in load_imagenet_category("test", seed=seed):
        lst = out.setdefault(f"in-{s.kind}", [])
        if len(lst) < per_kind:
            lst.append((("imagenet-test", idx[s.meta["file"]]), s.question, answer_text(s.answer), s.meta))
    for i, m in enumerate(store.meta["scenes-test"]):
        for q, a, kind, qtype in m["questions"]:
            lst = out.setdefault(f"sc-{kind}-{qtype}", [])
            if len(lst) < per_kind:
                lst.append((("scenes-test", i), q, named(a) if qtype == "what" else answer_text(a), m))
        lst = out.setdefault("sc-caption", [])
        if len(lst) < per_kind:
            lst.append((("scenes-test", i), "Describe the image.", m["caption"], m))
    import easy_vqa

    have = {m["image_id"]: j for j, m in enumerate(store.meta["easyvqa-test"])}
    for q, a, iid in zip(*easy_vqa.get_test_questions(), strict=True):
        if iid in have:
            lst = out.setdefault(f"ev-{easy_vqa_kind(a)}", [])
            if len(lst) < per_kind:
                lst.append((("easyvqa-test", have[iid]), q, answer_text(a), {}))
    return out


def run_checks(tr: Trainer, store: Store, checks: dict[str, list], n_generate: int, batch: int = 16) -> dict:
    """First-token accuracy per kind (greedy token == the answer's first token), plus, for the naming and
    caption kinds, ``n_generate`` greedy answers scored as the final evaluation scores them."""
    from vtprune.eval.open_answers import names_object, score_caption

    tr.model.eval()
    res = {}
    for kind, items in checks.items():
        if not items:
            continue
        hits = []
        for i in range(0, len(items), batch):
            chunk = items[i : i + batch]
            top, _ = tr.first_token(chunk, store.maps([it[0] for it in chunk]))
            hits += [int(t) == tr.enc.answer(it[2])[0] for t, it in zip(top.tolist(), chunk, strict=True)]
        res[kind] = {"first_token_acc": sum(hits) / len(hits), "n": len(hits)}
        if kind in ("in-what", "sc-caption") and n_generate:
            chunk = items[:n_generate]
            texts = tr.generate(chunk, store.maps([it[0] for it in chunk]), 40)
            if kind == "in-what":
                ok = [names_object(t, it[3]["label"], it[3]["wnid"]) for t, it in zip(texts, chunk, strict=True)]
                res[kind]["named"] = sum(ok) / len(ok)
            else:
                fields = [score_caption(t, it[3]) for t, it in zip(texts, chunk, strict=True)]
                res[kind]["fields"] = {f: sum(x[f] for x in fields) / len(fields) for f in fields[0]}
            res[kind]["examples"] = texts[:4]
    return res


# --------------------------------------------------------------------------------------------- training

def _others_running() -> int:
    me, n = os.getpid(), 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                n += f.read().rsplit(")", 1)[1].split()[0] == "R"
        except (OSError, IndexError):
            continue
    return n


def adaptive_threads(max_threads: int) -> int:
    """``max_threads`` when no other process is running, else 1: on the shared 2-core machine two
    OpenMP threads competing with another busy process run several times slower than one."""
    try:
        counts = sorted(_others_running() for _ in range(3))
    except OSError:
        return max_threads
    return max_threads if counts[1] == 0 else 1


MIX_TASKS = ("in-yes/no", "in-what", "scenes", "easyvqa", "category")  # the weights of --mix, in order
ALL_TRAIN_SETS = [f"imagenet-train-v{v}" for v in range(VIEWS)] + [f"scenes-train-s{s}" for s in SCENE_SEEDS] + ["easyvqa-train"]
CHECK_SETS = ["imagenet-test", "scenes-test", "easyvqa-test"]
STATS_SETS = ["imagenet-train-v0", "scenes-train-s0", "easyvqa-train"]  # the standardisation's statistics


def cmd_train(args):
    """Stage 1 (``--stage 1``: projector only) or stage 2 (projector + LoRA); resumes from
    ``<out>/checkpoint.pt``."""
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    cache = Path(args.cache)
    names = [n for n in (args.sets.split(",") if args.sets else ALL_TRAIN_SETS) if (cache / f"{n}.json").is_file()]
    store = Store(cache, names + CHECK_SETS)
    print(f"training sets: {names}", flush=True)
    rng = random.Random(args.seed)
    weights = [float(w) for w in args.mix.split(",")]
    if len(weights) not in (4, 5):
        raise SystemExit(f"--mix {args.mix!r}: give 4 or 5 weights (imagenet yes/no, imagenet what-is, scenes, "
                         "easy-VQA[, categories])")
    mix = dict(zip(MIX_TASKS, weights + [0.0] * (5 - len(weights)), strict=True))
    tasks = Tasks(store, mix, rng, args.caption_frac, args.single_turn, args.easyvqa_single,
                  tuple(t for t in args.prefer.split(",") if t))
    if args.init_weights and args.stage != 2:
        raise SystemExit("--init-weights starts stage 2 (projector + LoRA) from exported weights: use --stage 2")
    if args.init and args.init_weights:
        raise SystemExit("give --init (a stage-1 checkpoint) or --init-weights (exported weights), not both")
    tr = Trainer(args, store, lora=args.stage == 2)
    print(f"input scales {tr.scales}; LM forward in {'bf16 autocast' if tr.autocast else 'fp32'} "
          f"(native bf16 on this CPU: {tr.autocast})", flush=True)
    class_names = [r["label"] for r in sorted(imagenet_rows(Path(args.data)), key=lambda r: r["wnid"])]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    ckpt = out / "checkpoint.pt"
    proj_params, lora_params = tr.trainable()
    groups = [{"params": proj_params, "lr": args.lr_proj}]
    if lora_params:
        groups.append({"params": lora_params, "lr": args.lr_lora})
    opt = torch.optim.AdamW(groups, weight_decay=0.0, betas=(0.9, 0.98))
    warm = max(1, int(args.warmup * args.steps))

    def lr_at(step):  # step counts from 0
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, args.steps - warm)
        return args.min_lr + (1 - args.min_lr) * 0.5 * (1 + math.cos(math.pi * min(1.0, t)))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    history = {"loss": [], "checks": [], "seconds": 0.0}
    start = 0
    if ckpt.is_file():
        st = torch.load(ckpt, weights_only=False)
        if input_scales(st["args"]) != tr.scales:
            raise SystemExit(f"{ckpt} trained with input scales {input_scales(st['args'])}, this command gives "
                             f"{tr.scales}: resume with the same --finer-scale / --color-scale")
        tr.load_state(st["model"])
        opt.load_state_dict(st["opt"])
        sched.load_state_dict(st["sched"])
        rng.setstate(st["rng"])
        torch.set_rng_state(st["torch_rng"])
        history, start = st["history"], st["step"]
        print(f"resumed from {ckpt} at step {start}", flush=True)
    elif args.init:
        st = torch.load(args.init, weights_only=False)
        tr.proj.load_state_dict(st["model"]["proj"])
        print(f"projector from {args.init} (step {st['step']})", flush=True)
    elif args.init_weights:
        tr.load_bundled(Path(args.init_weights))
        # the warm start must be the exported model's function: its loss on one batch, both ways
        probe = [Tasks(store, mix, random.Random(args.seed + 1), args.caption_frac, False, args.easyvqa_single).sample()
                 for _ in range(args.batch)]
        maps = store.maps([it[0] for it in probe])
        tr.model.eval()
        with torch.no_grad():
            mine = float(tr.loss(probe, maps)[0])
        ref = tr.bundled_loss(Path(args.init_weights), probe, maps)
        history["warm_start"] = {"weights": str(args.init_weights), "loss": mine, "bundled_loss": ref}
        print(f"warm start from {args.init_weights}: loss at step 0 {mine:.5f}, the exported model's {ref:.5f}",
              flush=True)
        if abs(mine - ref) > 1e-3 * max(1.0, abs(ref)):
            raise SystemExit(f"warm start differs from the exported model ({mine:.5f} vs {ref:.5f}): not started")
    else:
        tr.classifier_init(class_names)
    checks = check_items(store, args.check_n)

    def save(step):
        st = {"model": tr.state(), "opt": opt.state_dict(), "sched": sched.state_dict(), "rng": rng.getstate(),
              "torch_rng": torch.get_rng_state(), "history": history, "step": step, "args": vars(args)}
        torch.save(st, str(ckpt) + ".tmp")
        os.replace(str(ckpt) + ".tmp", ckpt)

    def check(step):
        t0 = time.time()
        res = run_checks(tr, store, checks, args.check_generate)
        history["checks"].append({"step": step, **res})
        print(f"check at step {step} ({time.time() - t0:.0f}s): " + json.dumps(res), flush=True)

    if start == 0 and args.check_at_start:
        check(0)
    t_last = time.time()
    threads_used: dict[int, int] = history.setdefault("threads", {})
    history.setdefault("precision", []).append({"from_step": start, "autocast": "bf16" if tr.autocast else "fp32"})
    end = args.stop_at or args.steps
    for step in range(start, end):
        n_threads = adaptive_threads(args.threads)
        if n_threads != torch.get_num_threads():
            torch.set_num_threads(n_threads)
        threads_used[str(n_threads)] = threads_used.get(str(n_threads), 0) + 1
        tr.model.train()
        items = [tasks.sample() for _ in range(args.batch)]
        loss, per_turn = tr.loss(items, store.maps([it[0] for it in items]))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(proj_params + lora_params, 1.0)
        opt.step()
        sched.step()
        now = time.time()
        history["seconds"] += now - t_last
        t_last = now
        groups = tr.group_norms(tr.last_inputs)
        history["loss"].append({"step": step + 1, "loss": float(loss.detach()), "visual_norm": round(tr.visual_norm, 3),
                                "group_norms": groups, "by_task": [[tag, round(v, 4)] for tag, v in per_turn]})
        if (step + 1) % 10 == 0 or step == start:
            recent = history["loss"][-50:]
            print(f"step {step + 1}/{args.steps} loss {sum(r['loss'] for r in recent) / len(recent):.3f} "
                  f"lr {sched.get_last_lr()[0]:.2e} visual token norm {tr.visual_norm:.2f} "
                  f"(colour part {groups['color']:.3f}, finer {groups['finer']:.3f}, features {groups['feats']:.3f}) "
                  f"({history['seconds'] / (step + 1):.2f}s/step, "
                  f"{history['seconds']:.0f}s)", flush=True)
        if (step + 1) % args.save_every == 0:
            save(step + 1)
        if args.check_every and (step + 1) % args.check_every == 0 and step + 1 < end:
            check(step + 1)
            t_last = time.time()
    if start < end or not history["checks"] or history["checks"][-1]["step"] != end:
        save(end)
        check(end)
        save(end)
    (out / "history.json").write_text(json.dumps(history, indent=0))
    print(f"done: {end} steps, {history['seconds']:.0f}s training", flush=True)


def cmd_export(args):
    """Fold the input standardisation and the run's per-group input scales (:func:`fold_projector`) into
    linear_1 and write ``projector.safetensors`` (bfloat16
    weights, float32 biases: linear_1's bias carries GELU's +5 offset, which bfloat16 would round by up
    to 0.03, as much as a label embedding's entries) and ``lora/`` (peft adapter, bfloat16)."""
    from safetensors.torch import save_file

    st = torch.load(args.checkpoint, weights_only=False)
    stats = torch.load(Path(args.cache) / "channel-stats.pt")
    scales = input_scales(st["args"])
    print(f"input scales: {scales}")
    proj = fold_projector(st["model"]["proj"], stats, scales)
    out = Path(args.out)
    (out / "lora").mkdir(parents=True, exist_ok=True)
    save_file({k: (v.to(torch.bfloat16) if k.endswith("weight") else v).contiguous() for k, v in proj.items()},
              str(out / "projector.safetensors"), metadata={"format": "pt"})
    if "lora" in st["model"]:
        from peft import LoraConfig

        a = st["args"]
        cfg = LoraConfig(r=a["lora_rank"], lora_alpha=a["lora_alpha"], lora_dropout=0.0, bias="none",
                         target_modules=r".*language_model.*\.(" + "|".join(LORA_TARGETS) + ")")
        cfg.save_pretrained(str(out / "lora"))
        save_file({k: v.to(torch.bfloat16).contiguous() for k, v in st["model"]["lora"].items()},
                  str(out / "lora" / "adapter_model.safetensors"), metadata={"format": "pt"})
    (out / "record.json").write_text(json.dumps(export_record(st, args), indent=1) + "\n")
    for p in sorted(out.rglob("*.safetensors")):
        print(f"wrote {p} ({p.stat().st_size / 1e6:.2f} MB)")


def export_record(st: dict, args) -> dict:
    """What the exported weights were trained with: each stage's arguments, steps, seconds and last
    loss (running mean of 25), and the held-out ImageNet files (never trained on)."""
    stages = []
    init = st["args"].get("init")
    if init and Path(init).is_file():
        stages.append(torch.load(init, weights_only=False, map_location="cpu"))
    stages.append(st)
    rec: dict = {"stages": []}
    warm = st["args"].get("init_weights")
    if warm and (Path(warm) / "record.json").is_file():  # a warm start continues the exported model's stages
        rec["stages"] += json.loads((Path(warm) / "record.json").read_text())["stages"]
    for s in stages:
        loss = [r["loss"] for r in s["history"]["loss"]]
        rec["stages"].append({"args": s["args"], "steps": s["step"], "seconds": round(s["history"]["seconds"]),
                              "last_loss_mean25": round(sum(loss[-25:]) / max(1, len(loss[-25:])), 4),
                              "precision": s["history"].get("precision", [{"from_step": 0, "autocast": "bf16"}]),
                              **({"warm_start": s["history"]["warm_start"]} if "warm_start" in s["history"] else {})})
    data = Path(st["args"]["data"])
    rec["data"] = {"imagenet_split": {"seed": 0, "heldout_files": [r["file"] for r in imagenet_split(data, "test")]}}
    return rec


def cmd_plot(args):
    """The loss curves of consecutive stages (per-step training loss, running mean over 25 steps, per task
    group) as one PNG; ``--labels`` names the stages, in the order of the history files."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(12, 4.2))
    offset = 0
    labels = [x.strip() for x in args.labels.split(",")]
    if len(labels) != len(args.history):
        raise SystemExit(f"--labels names {len(labels)} stages for {len(args.history)} history files")
    for label, path in zip(labels, args.history, strict=True):
        h = json.loads(Path(path).read_text())
        steps = [offset + r["step"] for r in h["loss"]]
        loss = [r["loss"] for r in h["loss"]]
        run = [sum(loss[max(0, i - 24) : i + 1]) / len(loss[max(0, i - 24) : i + 1]) for i in range(len(loss))]
        axes[0].plot(steps, loss, alpha=0.25, lw=0.6)
        axes[0].plot(steps, run, label=f"{label} (running mean of 25)")
        groups: dict[str, list[tuple[int, float]]] = {}
        for r in h["loss"]:
            for task, v in r["by_task"]:
                g = task.split("-")[0] if not task.startswith("sc-") else "sc-" + task.split("-")[1]
                g = "sc-caption" if task == "sc-caption" else g
                groups.setdefault(g, []).append((offset + r["step"], v))
        for g, pts in sorted(groups.items()):
            xs, ys = zip(*pts, strict=True)
            k = 100
            sm = [sum(ys[max(0, i - k + 1) : i + 1]) / len(ys[max(0, i - k + 1) : i + 1]) for i in range(len(ys))]
            axes[1].plot(xs, sm, label=f"{label}: {g}", ls="-" if label == labels[-1] else ":")
        offset = steps[-1] if steps else offset
    axes[0].set(xlabel="step (each stage continues the last one's count)", ylabel="answer-token cross-entropy",
                title="training loss, batch 8")
    axes[1].set(xlabel="step", ylabel="per-question loss (running mean of 100 questions)", title="by task",
                yscale="log")
    axes[0].legend()
    axes[1].legend(fontsize=6, ncol=2)
    fig.tight_layout()
    fig.savefig(args.out, dpi=110)
    print("wrote", args.out)


def cmd_readout(args):
    """How linearly readable a scene's background colour is from a checkpoint's projected visual tokens (the
    mean of the 196 tokens, scikit-learn logistic regression fitted on ``scenes-train-s0``, scored on
    ``scenes-test``, flat-colour backgrounds only), beside the same read from the projector's colour inputs.
    Separates "the tokens do not carry the colour" (the projector) from "the LM does not read it" (the LoRA)."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    from vtprune.eval.stats import wilson

    torch.set_num_threads(args.threads)
    sets = ["scenes-train-s0", "scenes-test"]
    store = Store(Path(args.cache), sets)
    if args.checkpoint:
        st = torch.load(args.checkpoint, weights_only=False)
    else:  # exported weights: the projector unfolded onto the cache's standardised channels
        from safetensors.torch import load_file

        folded = load_file(str(Path(args.weights) / "projector.safetensors"))
        st = {"args": {}, "step": None}
        st["model"] = {"proj": unfold_projector(folded, torch.load(Path(args.cache) / "channel-stats.pt"),
                                                input_scales(st["args"]))}
    train_args = argparse.Namespace(**{**st["args"], "cache": args.cache})
    tr = Trainer(train_args, store, lora=False)
    tr.proj.load_state_dict(st["model"]["proj"])
    if args.target == "edges":
        return _readout_edges(tr, store, sets, st.get("step"))
    colour = INPUT_COLUMNS["color"]
    data = {}
    for name in sets:
        rows = [i for i, m in enumerate(store.meta[name]) if m["background"]["kind"] == "flat"]
        tokens, inputs = [], []
        with torch.no_grad():
            for lo in range(0, len(rows), 32):
                maps = store.maps([(name, i) for i in rows[lo:lo + 32]])
                x = tr.inputs(maps)
                tokens.append(tr.proj(x).mean(1))
                inputs.append(x[..., colour].mean(1))
        labels = [store.meta[name][i]["background"]["color"] for i in rows]
        data[name] = (torch.cat(tokens).numpy(), torch.cat(inputs).numpy(), labels)
    out = {"checkpoint": str(args.checkpoint or args.weights), "step": st.get("step"), "n_test": len(data[sets[1]][2])}
    for j, what in enumerate(("projected tokens", "colour inputs")):
        fit, test = data[sets[0]][j], data[sets[1]][j]
        scaler = StandardScaler().fit(fit)
        clf = LogisticRegression(max_iter=2000).fit(scaler.transform(fit), data[sets[0]][2])
        correct = int((clf.predict(scaler.transform(test)) == data[sets[1]][2]).sum())
        lo, hi = wilson(correct, len(test))
        out[what] = {"accuracy": correct / len(test), "ci95": [lo, hi]}
        print(f"{what}: background colour read at {100 * correct / len(test):.1f} % [{100 * lo:.1f}, {100 * hi:.1f}] "
              f"(n = {len(test)}, step {st.get('step')})")
    print(json.dumps(out))


def edge_cells(meta: dict, grid: int = 14, on: float = 0.25) -> dict[int, bool]:
    """The visual tokens of the image's border ring (the ``4 * grid - 4`` cells of a ``grid x grid`` map, row-major
    index) labelled by whether an edge shape covers them: True where a shape covers >= ``on`` of the cell,
    False where none touches it; cells a shape only grazes are left out."""
    cell = meta["canvas"] / grid
    out = {}
    for r in range(grid):
        for c in range(grid):
            if 0 < r < grid - 1 and 0 < c < grid - 1:
                continue
            x0, y0 = c * cell, r * cell
            cover = max((max(0.0, min(x0 + cell, b[2]) - max(x0, b[0])) * max(0.0, min(y0 + cell, b[3]) - max(y0, b[1]))
                         for b in (s["bbox"] for s in meta["shapes"])), default=0.0) / cell**2
            if cover >= on or cover == 0.0:
                out[r * grid + c] = cover >= on
    return out


def _readout_edges(tr, store, sets, step):
    """``readout --target edges``: is a small edge shape linearly readable from the visual token at its place?
    One row per border-ring token (:func:`edge_cells`) of every scene, a class-balanced logistic regression
    fitted on ``scenes-train-s0`` and scored on ``scenes-test``, from the projected token and from each input
    group at that token (the tower's features, its finer and colour channels). Prints the share of shape
    tokens and of empty ones read right (each with its Wilson 95 % interval) and the ROC AUC."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.metrics import roc_auc_score
    from sklearn.preprocessing import StandardScaler

    from vtprune.eval.stats import wilson

    groups = {"projected tokens": None, "tower features": INPUT_COLUMNS["feats"],
              "finer channels": INPUT_COLUMNS["finer"], "colour channels": INPUT_COLUMNS["color"]}
    data = {}
    for name in sets:
        rows = {k: [] for k in groups}
        labels = []
        with torch.no_grad():
            for lo in range(0, len(store.meta[name]), 32):
                idx = list(range(lo, min(lo + 32, len(store.meta[name]))))
                x = tr.inputs(store.maps([(name, i) for i in idx]))
                y = tr.proj(x)
                for b, i in enumerate(idx):
                    cells = edge_cells(store.meta[name][i])
                    keep = sorted(cells)
                    labels += [cells[t] for t in keep]
                    for what, cols in groups.items():
                        rows[what].append((y[b, keep] if cols is None else x[b, keep][:, cols]).numpy())
        data[name] = ({k: np.concatenate(v) for k, v in rows.items()}, np.array(labels))
    (_, y_fit), (_, y_test) = data[sets[0]], data[sets[1]]
    out = {"step": step, "n_test_tokens": int(len(y_test)), "n_test_shape_tokens": int(y_test.sum())}
    for what in groups:
        fit, test = data[sets[0]][0][what], data[sets[1]][0][what]
        scaler = StandardScaler().fit(fit)
        clf = LogisticRegression(max_iter=2000, class_weight="balanced").fit(scaler.transform(fit), y_fit)
        pred = clf.predict(scaler.transform(test))
        auc = roc_auc_score(y_test, clf.decision_function(scaler.transform(test)))
        hit, n_pos = int((pred & y_test).sum()), int(y_test.sum())
        rej, n_neg = int((~pred & ~y_test).sum()), int((~y_test).sum())
        (plo, phi), (nlo, nhi) = wilson(hit, n_pos), wilson(rej, n_neg)
        out[what] = {"shape_tokens": hit / n_pos, "empty_tokens": rej / n_neg, "auc": auc}
        print(f"{what}: shape tokens read {100 * hit / n_pos:.1f} % [{100 * plo:.1f}, {100 * phi:.1f}] (n = {n_pos}), "
              f"empty tokens {100 * rej / n_neg:.1f} % [{100 * nlo:.1f}, {100 * nhi:.1f}] (n = {n_neg}), "
              f"ROC AUC {auc:.3f} (step {step})")
    print(json.dumps(out))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    f = sub.add_parser("features", help="precompute the frozen tower's maps")
    f.add_argument("--data", default=str(default_data_root()))
    f.add_argument("--cache", default=str(DEFAULT_CACHE))
    f.add_argument("--threads", type=int, default=2)
    f.add_argument("--batch", type=int, default=8)
    t = sub.add_parser("train", help="stage 1 (projector) or stage 2 (projector + LoRA)")
    t.add_argument("--stage", type=int, choices=(1, 2), required=True)
    t.add_argument("--data", default=str(default_data_root()))
    t.add_argument("--cache", default=str(DEFAULT_CACHE))
    t.add_argument("--out", required=True, help="folder of checkpoint.pt / history.json (outside the repo)")
    t.add_argument("--init", default=None, help="stage 2: the stage-1 checkpoint.pt whose projector to start from")
    t.add_argument("--sets", default="", help="comma-separated training feature sets (default: all present)")
    t.add_argument("--init-weights", default=None,
                   help="stage 2: start from exported weights (a folder with projector.safetensors and lora/, e.g. "
                        "the bundled vtprune/models/weights): warm start, checked to give the exported model's loss")
    t.add_argument("--mix", default="0.25,0.1,0.4,0.25",
                   help="weights of imagenet yes/no, imagenet what-is, scenes, easy-VQA[, category questions]")
    t.add_argument("--finer-scale", type=float, default=DEFAULT_SCALES["finer"],
                   help="input scale of the 112 standardised finer channels (the features keep 1/sqrt(1440))")
    t.add_argument("--color-scale", type=float, default=DEFAULT_SCALES["color"],
                   help="input scale of the 48 standardised colour-thumbnail channels")
    t.add_argument("--easyvqa-single", type=float, default=0.5,
                   help="fraction of easy-VQA items asked alone (else one colour + one shape question)")
    t.add_argument("--caption-frac", type=float, default=0.2, help="fraction of scene questions that are captions")
    t.add_argument("--prefer", default="",
                   help="comma-separated question tags drawn first where a scene part or an easy-VQA image has one "
                        "(e.g. sc-background-color,ev-color: a stage that drills colour)")
    t.add_argument("--steps", type=int, default=1000, help="length of the lr schedule")
    t.add_argument("--stop-at", type=int, default=0, help="stop after this many steps (0: --steps)")
    t.add_argument("--single-turn", action="store_true",
                   help="one question per image (stage 1); default: scenes and easy-VQA as conversations")
    t.add_argument("--batch", type=int, default=8)
    t.add_argument("--lr-proj", type=float, default=1e-3)
    t.add_argument("--lr-lora", type=float, default=5e-4)
    t.add_argument("--warmup", type=float, default=0.05, help="fraction of steps of linear warm-up")
    t.add_argument("--min-lr", type=float, default=0.1, help="cosine floor as a fraction of the peak")
    t.add_argument("--lora-rank", type=int, default=8)
    t.add_argument("--lora-alpha", type=float, default=16)
    t.add_argument("--lora-dropout", type=float, default=0.0)
    t.add_argument("--save-every", type=int, default=25)
    t.add_argument("--check-every", type=int, default=0)
    t.add_argument("--check-n", type=int, default=40, help="held-out questions per kind in a check")
    t.add_argument("--check-generate", type=int, default=10, help="greedy answers scored per open kind in a check")
    t.add_argument("--check-at-start", action="store_true")
    t.add_argument("--threads", type=int, default=2)
    t.add_argument("--seed", type=int, default=0)
    e = sub.add_parser("export", help="write the trained weights (bfloat16) into the package")
    e.add_argument("--checkpoint", required=True)
    e.add_argument("--cache", default=str(DEFAULT_CACHE))
    e.add_argument("--out", default=str(D.WEIGHTS_DIR))
    pl = sub.add_parser("plot", help="the loss curves as a PNG")
    pl.add_argument("history", nargs="+", help="history.json of each stage, in order (e.g. stage 1, then stage 2)")
    pl.add_argument("--labels", default="stage 1,stage 2", help="comma-separated stage names, one per history file")
    pl.add_argument("--out", default=str(D.WEIGHTS_DIR / "loss.png"))
    r = sub.add_parser("readout", help="is the background colour (or an edge shape) linearly readable from a "
                                       "checkpoint's visual tokens?")
    which = r.add_mutually_exclusive_group(required=True)
    which.add_argument("--checkpoint", help="a training checkpoint.pt")
    which.add_argument("--weights", help="a folder of exported weights (projector.safetensors), e.g. the package's")
    r.add_argument("--cache", default=str(DEFAULT_CACHE))
    r.add_argument("--target", choices=("colour", "edges"), default="colour",
                   help="colour: the background colour from the mean token; edges: a small edge shape from the "
                        "token at its place")
    r.add_argument("--threads", type=int, default=1)
    args = ap.parse_args()
    {"features": cmd_features, "train": cmd_train, "export": cmd_export, "plot": cmd_plot,
     "readout": cmd_readout}[args.cmd](args)


if __name__ == "__main__":
    main()
