#!/usr/bin/env python
"""Precompute the frozen EfficientNet-Lite0 tower features used to train the vtprune projector.

For every image the tower's final feature map is stored as ``[196, 1280]`` float16 tokens (448x448
input, mean = std = 0.5, exactly the preprocessing of the bundled ``LlavaProcessor``).

Inputs (read in place, never copied into the repository):
  * ``<data>/imagenet-sample/`` -- 1000 ImageNet photos (one per class) + ``labels.jsonl``;
  * easy-VQA (PyPI ``easy_vqa``) train images (first ``--easyvqa-images`` ids).

With ``--scenes``, instead: the ``scenes`` train and test splits (``vtprune.eval.datasets.scenes``, built in
memory, seed 0) to ``--scenes-out`` (default ``~/.cache/vtprune/scenes-features.pt``) as
``{"train" / "test": {"feats"[N,196,1280] fp16, "questions": [[scene, question, answer, kind, qtype]]}}``.

Output: one ``torch.save`` file (default ``~/.cache/vtprune/projector-features.pt``) with
``{"imagenet": {"files", "labels", "feats"[N,196,1280] fp16}, "easyvqa": {"ids", "feats"}}``.

Usage: ``python scripts/prepare_projector_data.py [--data ../shared/data] [--out PATH]`` and
``python scripts/prepare_projector_data.py --scenes``
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

import torch
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))

from vtprune.models.default import build_image_processor  # noqa: E402
from vtprune.models.efficientnet_tower import EfficientNetLiteTower  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

CACHE = Path(os.environ.get("VTPRUNE_CACHE") or Path.home() / ".cache" / "vtprune")
DEFAULT_OUT = CACHE / "projector-features.pt"
SCENES_OUT = CACHE / "scenes-features.pt"


@torch.no_grad()
def extract(tower, image_processor, paths, batch=8, tag=""):
    """Feature-map tokens of images given as paths or in-memory PIL images."""
    out = []
    t0 = time.time()
    for i in range(0, len(paths), batch):
        ims = [p.convert("RGB") if isinstance(p, Image.Image) else Image.open(p).convert("RGB")
               for p in paths[i : i + batch]]
        px = image_processor(images=ims, return_tensors="pt")["pixel_values"]
        out.append(tower(px).hidden_states[-1].to(torch.float16))
        if (i // batch) % 10 == 0:
            print(f"[{tag}] {i + len(ims)}/{len(paths)} images, {time.time() - t0:.0f}s", flush=True)
    return torch.cat(out) if out else torch.empty(0, 196, 1280, dtype=torch.float16)


def write_scenes_features(tower, image_processor, data: Path, out: str) -> None:
    from vtprune.eval.datasets.scenes import iter_scenes

    result = {}
    for split in ("train", "test"):
        images, questions = [], []
        for s, image, _, qs in iter_scenes(split, root=data):
            images.append(image)
            questions.extend([s, *q] for q in qs)
        result[split] = {"feats": extract(tower, image_processor, images, tag=f"scenes/{split}"),
                         "questions": questions}
        print(f"scenes/{split}: {len(images)} scenes, {len(questions)} questions", flush=True)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, out)
    print("wrote", out)


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--data", default=str(SHARED_DATA), help="../shared/data beside the repository")
    ap.add_argument("--out", default=str(DEFAULT_OUT))
    ap.add_argument("--easyvqa-images", type=int, default=300)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--scenes", action="store_true", help="write the scenes splits' features to --scenes-out instead")
    ap.add_argument("--scenes-out", default=str(SCENES_OUT))
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    tower = EfficientNetLiteTower.from_imagenet()
    ip = build_image_processor()
    if args.scenes:
        write_scenes_features(tower, ip, Path(args.data), args.scenes_out)
        return
    root = Path(args.data) / "imagenet-sample"
    rows = [json.loads(line) for line in open(root / "labels.jsonl")]
    feats = extract(tower, ip, [root / r["file"] for r in rows], tag="imagenet")
    result = {"imagenet": {"files": [r["file"] for r in rows], "labels": [r["label"] for r in rows],
                           "wnids": [r["wnid"] for r in rows], "feats": feats}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    torch.save(result, args.out + ".partial")
    if args.easyvqa_images > 0:
        import easy_vqa

        paths = easy_vqa.get_train_image_paths()
        ids = sorted(paths)[: args.easyvqa_images]
        result["easyvqa"] = {"ids": ids, "feats": extract(tower, ip, [paths[i] for i in ids], tag="easyvqa")}
    torch.save(result, args.out)
    os.remove(args.out + ".partial")
    print("wrote", args.out)


if __name__ == "__main__":
    main()
