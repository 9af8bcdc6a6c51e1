"""Probe: frozen SmolLM2 yes/no with the true label given as TEXT, over several chat/completion templates.
Measures how well the LM alone can match "Is there a {q}?" against the label (AUC, acc at 0, best threshold).
Run: python scripts/experiments/text_probe.py (100 held-out images, 200 questions; reads ../shared/data)."""
import json
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "src"))

from train_projector import split_imagenet  # noqa: E402

from vtprune.models.default import load_language_model  # noqa: E402

torch.set_num_threads(2)
lm, tok = load_language_model()
lm.eval()
with open(ROOT.parent / "shared" / "data" / "imagenet-sample" / "labels.jsonl") as fh:
    rows = [json.loads(line) for line in fh]
files = [r["file"] for r in rows]
labels = [r["label"] for r in rows]
tr, te = split_imagenet(files, 0)
rng = random.Random(1)
items = []
for i in te[:100]:
    j = rng.choice([k for k in te if k != i])
    items.append((labels[i], labels[i], 1))
    items.append((labels[i], labels[j], 0))
yes = [tok.encode(w)[0] for w in ["Yes", " Yes", "yes"]]
no = [tok.encode(w)[0] for w in ["No", " No", "no"]]
print(yes, no)


def chat(user, system=None, prefix=""):
    s = ""
    if system:
        s += f"<|im_start|>system\n{system}<|im_end|>\n"
    return s + f"<|im_start|>user\n{user}<|im_end|>\n<|im_start|>assistant\n{prefix}"


FEW = ("You answer yes/no questions about an image from its description. Examples:\n"
       "Image: a dog. Is there a dog in the image? Yes\n"
       "Image: a dog. Is there a car in the image? No\n"
       "Image: a red apple. Is there an apple in the image? Yes\n"
       "Image: a ship. Is there a cat in the image? No")
T = {
    "shows": lambda lab, q: chat(f"The image shows a {lab}.\nIs there a {q} in the image?"),
    "label_nl": lambda lab, q: chat(f"{lab}\nIs there a {q} in the image?"),
    "fewshot_sys": lambda lab, q: chat(f"Image: a {lab}. Is there a {q} in the image?", FEW),
    "same": lambda lab, q: chat(f"Is '{q}' the same as '{lab}'? Answer yes or no."),
    "repeat": lambda lab, q: chat(
        f"Image: {lab}\nIs there a {q} in the image? Answer Yes if the words match."
    ),
    "fewshot_user": lambda lab, q: chat(FEW + f"\nImage: a {lab}. Is there a {q} in the image?"),
    "raw_fewshot": lambda lab, q: (FEW + f"\nImage: a {lab}. Is there a {q} in the image?"),
}


def auc(pos, neg):
    c = 0
    for p in pos:
        for n in neg:
            c += (p > n) + 0.5 * (p == n)
    return c / (len(pos) * len(neg))


for name, f in T.items():
    d = []
    for lab, q, _y in items:
        ids = tok(f(lab, q), return_tensors="pt").input_ids
        with torch.no_grad():
            lo = lm(ids).logits[0, -1]
        d.append((lo[yes].max() - lo[no].max()).item())
    pos = [x for x, (_, _, y) in zip(d, items, strict=True) if y]
    neg = [x for x, (_, _, y) in zip(d, items, strict=True) if not y]
    acc = sum((x > 0) == bool(y) for x, (_, _, y) in zip(d, items, strict=True)) / len(items)
    best = max(sum((x > t) == bool(y) for x, (_, _, y) in zip(d, items, strict=True)) for t in d) / len(items)
    print(f"{name:14s} auc {auc(pos, neg):.3f} acc {acc:.3f} best-thr {best:.3f} "
          f"frac_yes {sum(x > 0 for x in d) / len(d):.2f}", flush=True)
