"""Probe: can the bundled model answer the scene set's background / periphery yes/no questions if each visual
token also carried a colour-name histogram of its 32 x 32 pixel patch, projected onto the colour words'
input embeddings (the way the class posterior is projected onto label embeddings)?

No training: visual token = bundled projector(tower tokens) + w * sum_c h_c E(" {colour c}"), h = the patch's
soft colour-name histogram (softmax(-|rgb - named rgb|^2 / tau) per pixel, averaged over the patch).
Prints yes/no accuracy per scene kind (first N test-split yes/no questions of each kind) for each w.
Run: python scripts/experiments/colour_probe.py [N] [w,w,...] (needs prepare_projector_data.py --scenes).
"""
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
N = int(sys.argv[1]) if len(sys.argv) > 1 else 60
WEIGHTS = [float(x) for x in sys.argv[2].split(",")] if len(sys.argv) > 2 else [0.0, 0.5, 1.0, 2.0]
sys.argv = [sys.argv[0]]
sys.path.insert(0, str(ROOT / "scripts"))

import train_projector as tp  # noqa: E402

from vtprune.eval.scenes import COLORS, iter_scenes  # noqa: E402

torch.set_num_threads(2)
TAU = 2000.0  # squared RGB distance units


def colour_hist(image) -> torch.Tensor:
    """[196, C] soft colour-name histogram of each 32 x 32 patch (row-major, the tower's token order)."""
    px = torch.tensor(np.asarray(image.convert("RGB").resize((448, 448))), dtype=torch.float32)  # [448, 448, 3]
    ref = torch.tensor(list(COLORS.values()), dtype=torch.float32)  # [C, 3]
    d2 = ((px[:, :, None, :] - ref) ** 2).sum(-1)  # [448, 448, C]
    soft = torch.softmax(-d2 / TAU, dim=-1)
    return soft.view(14, 32, 14, 32, -1).mean((1, 3)).reshape(196, -1)


scenes = torch.load(str(tp.cache_root() / "scenes-features.pt"))["test"]
items = {}
for s, q, a, kind, qtype in scenes["questions"]:
    if qtype == "yes/no" and len(items.setdefault(kind, [])) < N:
        items[kind].append((s, q, a.capitalize()))
need = sorted({s for v in items.values() for s, _, _ in v})
hist = {}
for s, image, _, _ in iter_scenes("test", max(need) + 1):
    if s in hist or s not in need:
        continue
    hist[s] = colour_hist(image)

model, processor = tp.assemble(None)
proj = model.model.multi_modal_projector
proj.load_state_dict(load_file(str(ROOT / "src/vtprune/models/projector/projector.safetensors")))
enc = tp.Encoder(processor)
pad = processor.tokenizer.pad_token_id
yes_id, no_id = enc.answer_ids("Yes")[0], enc.answer_ids("No")[0]
E = torch.stack([tp.label_embedding(model, processor.tokenizer, c) for c in COLORS]).detach()  # [C, 576]
feats = {s: torch.cat([scenes["feats"][s].float(), hist[s]], -1) for s in need}
orig_tower_tokens = tp.tower_tokens


class WithColour(torch.nn.Module):
    def __init__(self, inner, w):
        super().__init__()
        self.inner, self.w = inner, w

    def forward(self, x):
        return self.inner(x[..., :-len(COLORS)]) + self.w * (x[..., -len(COLORS):] @ E)


def tower_tokens(model, f):
    return torch.cat([orig_tower_tokens(model, f[..., :1280]), f[..., 1280:]], -1)


tp.tower_tokens = tower_tokens
for w in WEIGHTS:
    model.model.multi_modal_projector = WithColour(proj, w)
    with torch.no_grad():
        res = {k: tp.evaluate(model, enc, feats, v, yes_id, no_id, pad) for k, v in items.items()}
    print(f"w={w}: " + ", ".join(f"{k} acc {a:.2f} (P(yes) {py:.2f}, Yes/No {fmt:.2f})"
                                 for k, (a, py, fmt) in res.items()), flush=True)
