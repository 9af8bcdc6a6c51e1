"""Probe: frozen SmolLM2 yes/no in a 4-shot completion prompt, soft tokens = posterior-weighted label embs.
Posterior of EfficientNet global logits (x4) or 49 x (k * token + global logits), T=0.1/0.03; reordered shots.
Run: python scripts/experiments/lm_probe2.py [N_IMAGES=60] (2 questions per held-out image; README: 60)."""
import random
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "src"))

from train_projector import split_imagenet  # noqa: E402

from vtprune.models.default import cache_root, load_language_model  # noqa: E402
from vtprune.models.efficientnet_tower import EfficientNetLiteTower, EfficientNetLiteTowerConfig  # noqa: E402

torch.set_num_threads(2)
lm, tok = load_language_model()
lm.eval()
E = lm.get_input_embeddings().weight.detach()
tower = EfficientNetLiteTower.from_imagenet(EfficientNetLiteTowerConfig(image_size=448, patch_size=32)).eval()
fc = tower.backbone._fc
data = torch.load(cache_root() / "projector-features.pt")["imagenet"]
files, labels, wnids, feats = data["files"], data["labels"], data["wnids"], data["feats"]
order = sorted(range(1000), key=lambda i: wnids[i])
cls_labels = [labels[i] for i in order]


def ids(s):
    return tok(s, add_special_tokens=False).input_ids


LE_mean = torch.stack([E[ids(" " + lab)].mean(0) for lab in cls_labels])
LE_first = torch.stack([E[ids(" " + lab)[0]] for lab in cls_labels])
LE_last = torch.stack([E[ids(" " + lab)[-1]] for lab in cls_labels])
tr, te = split_imagenet(files, 0)
rng = random.Random(1)
items = []
N = int(sys.argv[1]) if len(sys.argv) > 1 else 60
for i in te[:N]:
    j = rng.choice([k for k in te if k != i])
    items.append((i, labels[i], 1))
    items.append((i, labels[j], 0))
yes = [tok.encode(w)[0] for w in ["Yes", " Yes"]]
no = [tok.encode(w)[0] for w in ["No", " No"]]
FEW = ("Image: a dog. Is there a dog in the image? Yes\n"
       "Image: a dog. Is there a car in the image? No\n"
       "Image: a red apple. Is there an apple in the image? Yes\n"
       "Image: a ship. Is there a cat in the image? No\n")
with torch.no_grad():
    f = feats.float()
    pooled49 = (
        torch.nn.functional.avg_pool2d(f.view(1000, 14, 14, 1280).permute(0, 3, 1, 2), 2)
        .permute(0, 2, 3, 1)
        .reshape(1000, 49, 1280)
    )
    l49 = fc(pooled49)
    g = fc(f.mean(1))


def run(name, vis_fn):
    d = []
    for i, q, _y in items:
        pre = E[ids(FEW + "Image:")]
        post = E[ids(f". Is there a {q} in the image?")]
        emb = torch.cat([pre, vis_fn(i), post])[None]
        with torch.no_grad():
            lo = lm(inputs_embeds=emb).logits[0, -1]
        d.append((lo[yes].max() - lo[no].max()).item())
    pos = [x for x, (_, _, y) in zip(d, items, strict=True) if y]
    neg = [x for x, (_, _, y) in zip(d, items, strict=True) if not y]
    auc = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg) / (len(pos) * len(neg))
    acc = sum((x > 0) == bool(y) for x, (_, _, y) in zip(d, items, strict=True)) / len(items)
    best = max(sum((x > t) == bool(y) for x, (_, _, y) in zip(d, items, strict=True)) for t in d) / len(items)
    print(f"{name:28s} auc {auc:.3f} acc {acc:.3f} best-thr {best:.3f} "
          f"frac_yes {sum(x > 0 for x in d) / len(d):.2f}", flush=True)


ci = {i: order.index(i) for i in range(1000)}
for T in [0.1, 0.03]:
    run(f"global T={T} x4", lambda i, T=T: (g[i] / T).softmax(-1)[None].repeat(4, 1) @ LE_mean)
    run(f"loc49*0.5+glob T={T}", lambda i, T=T: ((0.5 * l49[i] + g[i]) / T).softmax(-1) @ LE_mean)
    run(f"loc49*0.25+glob T={T}", lambda i, T=T: ((0.25 * l49[i] + g[i]) / T).softmax(-1) @ LE_mean)
FEW = ("Image: a dog. Is there a car in the image? No\n"
       "Image: a red apple. Is there an apple in the image? Yes\n"
       "Image: a ship. Is there a cat in the image? No\n"
       "Image: a dog. Is there a dog in the image? Yes\n")
run("FEW2 oracle mean x4", lambda i: LE_mean[ci[i]][None].repeat(4, 1))
run("FEW2 loc49*0.5+glob T=0.1", lambda i: ((0.5 * l49[i] + g[i]) / 0.1).softmax(-1) @ LE_mean)
