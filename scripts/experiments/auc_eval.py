"""Held-out yes/no of a projector checkpoint: accuracy, AUC and best-threshold accuracy of logit(Yes) - logit(No).
The first N questions of train_projector.py's held-out set (positive + negative per image), 196 tokens.
Run: python scripts/experiments/auc_eval.py PROJECTOR.safetensors N"""
import random
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import train_projector as tp  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from vtprune.models.default import cache_root  # noqa: E402

torch.set_num_threads(1)
model, proc = tp.assemble(None)
model.model.multi_modal_projector.load_state_dict(load_file(sys.argv[1]))
enc = tp.Encoder(proc)
tok = proc.tokenizer
data = torch.load(cache_root() / "projector-features.pt")["imagenet"]
files, labels = data["files"], data["labels"]
tr, ho = tp.split_imagenet(files, 0)
erng = random.Random(1)
items = []
for i in ho:
    items.append((i, f"Is there a {labels[i]} in the image?", 1))
    j = erng.choice([k for k in ho if labels[k] != labels[i]])
    items.append((i, f"Is there a {labels[j]} in the image?", 0))
items = items[: int(sys.argv[2])]
yes = enc.answer_ids("Yes")[0]
no = enc.answer_ids("No")[0]
ds = []
with torch.no_grad():
    for k in range(0, len(items), 10):
        ch = items[k:k+10]
        ids, att, _ = tp.make_batch(enc, [(i, q, None) for i, q, _ in ch], tok.pad_token_id)
        lo = tp.forward(model, ids, att, torch.stack([data["feats"][i] for i, _, _ in ch]).float(), logits_to_keep=1).logits[:, -1]
        ds += (lo[:, yes] - lo[:, no]).tolist()
y = [g for *_, g in items]
pos = [d for d, g in zip(ds, y, strict=True) if g]
neg = [d for d, g in zip(ds, y, strict=True) if not g]
auc = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
best = max(sum((d > t) == bool(g) for d, g in zip(ds, y, strict=True)) / len(y) for t in ds + [-1e9])
acc = sum((d > 0) == bool(g) for d, g in zip(ds, y, strict=True)) / len(y)
print(f"n={len(y)} acc={acc:.3f} auc={auc:.3f} best-thr={best:.3f} mean d pos={sum(pos)/len(pos):.2f} neg={sum(neg)/len(neg):.2f}")
