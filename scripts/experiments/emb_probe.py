"""Probe: ridge map from mean-pooled tower features to the label word embedding, fit on the 800 train classes.
Prints held-out retrieval top-1 among all 1000 and among the 200 held-out label embeddings per ridge lambda.
Run: python scripts/experiments/emb_probe.py (needs projector-features.pt from prepare_projector_data.py)."""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "src"))

from train_projector import split_imagenet  # noqa: E402

from vtprune.models.default import cache_root, load_language_model  # noqa: E402

torch.set_num_threads(2)
lm, tok = load_language_model()
lm.eval()
E = lm.get_input_embeddings().weight.detach()
data = torch.load(cache_root() / "projector-features.pt")["imagenet"]
files, labels, feats = data["files"], data["labels"], data["feats"]
tr, te = split_imagenet(files, 0)
pooled = feats.float().mean(1)


def lab_emb(lab):
    return E[tok(" " + lab, add_special_tokens=False).input_ids].mean(0)


Y = torch.stack([lab_emb(lab) for lab in labels])
X = pooled.double()
Yd = Y.double()
Xtr, Ytr = X[tr], Yd[tr]
mx, my = Xtr.mean(0), Ytr.mean(0)
for lam in [1e-3, 1e-2, 1e-1, 1.0]:
    W = torch.linalg.solve(
        (Xtr - mx).T @ (Xtr - mx) + lam * len(tr) * torch.eye(X.shape[1], dtype=X.dtype),
        (Xtr - mx).T @ (Ytr - my),
    )
    P = ((X - mx) @ W + my).float()
    # retrieval accuracy among all 1000 label embeddings, held-out
    sims = torch.nn.functional.normalize(P[te], dim=-1) @ torch.nn.functional.normalize(Y, dim=-1).T
    top1 = (sims.argmax(-1) == torch.tensor(te)).float().mean().item()
    simte = torch.nn.functional.normalize(P[te], dim=-1) @ torch.nn.functional.normalize(Y[te], dim=-1).T
    top1te = (simte.argmax(-1) == torch.arange(len(te))).float().mean().item()
    print(f"lam {lam}: heldout retrieval top1 among 1000 {top1:.3f}, among 200 heldout {top1te:.3f}",
          flush=True)
