"""Probe: top-1/top-5 of EfficientNet-Lite0's own ImageNet head on the cached 448 px projector features.
Global (mean-pooled) logits vs per-token logits at 196 tokens and at 49 (2x2-pooled) tokens; see README.md.
Run: python scripts/experiments/cls_probe.py (needs projector-features.pt from prepare_projector_data.py)."""
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "src"))

from vtprune.models.default import cache_root  # noqa: E402
from vtprune.models.efficientnet_tower import EfficientNetLiteTower, EfficientNetLiteTowerConfig  # noqa: E402

torch.set_num_threads(2)
tower = EfficientNetLiteTower.from_imagenet(EfficientNetLiteTowerConfig(image_size=448, patch_size=32)).eval()
fc = tower.backbone._fc
data = torch.load(cache_root() / "projector-features.pt")["imagenet"]
files, labels, wnids, feats = data["files"], data["labels"], data["wnids"], data["feats"]
order = sorted(range(1000), key=lambda i: wnids[i])  # class index -> sample index
cls_of_sample = torch.empty(1000, dtype=torch.long)
cls_of_sample[torch.tensor(order)] = torch.arange(1000)
with torch.no_grad():
    f = feats.float()
    g = fc(f.mean(1))
    top1 = (g.argmax(-1) == cls_of_sample).float().mean().item()
    top5 = (g.topk(5, -1).indices == cls_of_sample[:, None]).any(-1).float().mean().item()
    loc = fc(f)  # [1000,196,1000]
    loc_top1 = (loc.argmax(-1) == cls_of_sample[:, None]).float().mean().item()
    pooled49 = (
        torch.nn.functional.avg_pool2d(f.view(1000, 14, 14, 1280).permute(0, 3, 1, 2), 2)
        .permute(0, 2, 3, 1)
        .reshape(1000, 49, 1280)
    )
    l49 = fc(pooled49)
    l49_top1 = (l49.argmax(-1) == cls_of_sample[:, None]).float().mean().item()
print(f"global top1 {top1:.3f} top5 {top5:.3f}; "
      f"per-location top1 (196) {loc_top1:.3f}; per 2x2 (49) {l49_top1:.3f}")
print("max prob global mean", g.softmax(-1).max(-1).values.mean().item())
