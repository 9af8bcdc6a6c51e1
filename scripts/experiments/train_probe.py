"""Probe: at 49 (2x2-pooled) tokens, train only Linear(posterior 1000 -> 576), label-emb init, BCE.
Args N_EVAL ALPHA T STEPS LR; posterior = softmax((ALPHA * token logits + global logits) / T); batch 8.
Run: python scripts/experiments/train_probe.py 120 0.5 0.1 120 1e-3 (the README run)."""
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "src"))

from train_projector import split_imagenet  # noqa: E402

from vtprune.models.default import cache_root, load_language_model  # noqa: E402
from vtprune.models.efficientnet_tower import EfficientNetLiteTower, EfficientNetLiteTowerConfig  # noqa: E402

torch.set_num_threads(2)
torch.manual_seed(0)
lm, tok = load_language_model()
lm.eval()
for p in lm.parameters():
    p.requires_grad_(False)
E = lm.get_input_embeddings().weight.detach()
tower = EfficientNetLiteTower.from_imagenet(EfficientNetLiteTowerConfig(image_size=448, patch_size=32)).eval()
fc = tower.backbone._fc
data = torch.load(cache_root() / "projector-features.pt")["imagenet"]
files, labels, wnids, feats = data["files"], data["labels"], data["wnids"], data["feats"]
order = sorted(range(1000), key=lambda i: wnids[i])
cls_labels = [labels[i] for i in order]


def ids(s):
    return tok(s, add_special_tokens=False).input_ids


LE = torch.stack([E[ids(" " + lab)].mean(0) for lab in cls_labels])
tr, te = split_imagenet(files, 0)
ALPHA, T = float(sys.argv[2]), float(sys.argv[3])
with torch.no_grad():
    f = feats.float()
    f49 = (
        torch.nn.functional.avg_pool2d(f.view(1000, 14, 14, 1280).permute(0, 3, 1, 2), 2)
        .permute(0, 2, 3, 1)
        .reshape(1000, 49, 1280)
    )
    P49 = ((ALPHA * fc(f49) + fc(f.mean(1))[:, None]) / T).softmax(-1)  # [1000,49,1000]
lin = torch.nn.Linear(1000, 576)
with torch.no_grad():
    lin.weight.copy_(LE.T)
    lin.bias.zero_()
FEW = ("Image: a dog. Is there a car in the image? No\n"
       "Image: a red apple. Is there an apple in the image? Yes\n"
       "Image: a ship. Is there a cat in the image? No\n"
       "Image: a dog. Is there a dog in the image? Yes\n")
pre = E[ids(FEW + "Image:")]
yes, no = ids(" Yes")[0], ids(" No")[0]


def batch_logits(items):
    embs = []
    for i, q in items:
        post = E[ids(f". Is there a {q} in the image?")]
        embs.append(torch.cat([pre, lin(P49[i]), post]))
    n = max(e.shape[0] for e in embs)
    x = torch.zeros(len(embs), n, 576)
    att = torch.zeros(len(embs), n, dtype=torch.long)
    for k, e in enumerate(embs):
        x[k, n - len(e):] = e
        att[k, n - len(e):] = 1
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    lo = lm(inputs_embeds=x, attention_mask=att, position_ids=pos).logits[:, -1]
    return lo[:, yes] - lo[:, no]


rng = random.Random(1)
ev = []
for i in te:
    j = rng.choice([k for k in te if k != i])
    ev += [(i, labels[i], 1), (i, labels[j], 0)]
ev = ev[:int(sys.argv[1])]


def evaluate():
    with torch.no_grad():
        d = torch.cat([batch_logits([(i, q) for i, q, _ in ev[k:k + 16]]) for k in range(0, len(ev), 16)])
    y = torch.tensor([y for *_, y in ev]).bool()
    return ((d > 0) == y).float().mean().item(), (d > 0).float().mean().item()


t0 = time.time()
print("init", evaluate(), f"{time.time() - t0:.0f}s", flush=True)
opt = torch.optim.AdamW(lin.parameters(), lr=float(sys.argv[5]))
trng = random.Random(0)
for step in range(1, int(sys.argv[4]) + 1):
    b = []
    y = []
    for _ in range(8):
        i = trng.choice(tr)
        if trng.random() < 0.5:
            b.append((i, labels[i]))
            y.append(1.0)
        else:
            j = trng.choice(tr)
            b.append((i, labels[j]))
            y.append(0.0)
    d = batch_logits(b)
    loss = torch.nn.functional.binary_cross_entropy_with_logits(d, torch.tensor(y))
    opt.zero_grad()
    loss.backward()
    opt.step()
    if step % 10 == 0:
        print(step, round(loss.item(), 3), f"{time.time() - t0:.0f}s", flush=True)
    if step % 40 == 0:
        print("eval", evaluate(), flush=True)
