"""Probe: held-out yes/no accuracy and P(yes) of the checked-in projector with 49 (2x2-pooled) image tokens.
Uses train_projector.py's split, one positive and one random held-out negative per image (README: 0.475).
Run: python scripts/experiments/eval49.py (no arguments; loads the bundled projector.safetensors)."""
import random
import sys
from pathlib import Path

import torch
from safetensors.torch import load_file

ROOT = Path(__file__).resolve().parents[2]
sys.argv = [sys.argv[0]]
sys.path.insert(0, str(ROOT / "scripts"))

import train_projector as tp  # noqa: E402

torch.set_num_threads(2)
data = torch.load(str(tp.cache_root() / "projector-features.pt"))["imagenet"]
files, labels = data["files"], data["labels"]
tr, ho = tp.split_imagenet(files, 0)
model, processor = tp.assemble(None)
model.model.multi_modal_projector.load_state_dict(
    load_file(str(ROOT / "src" / "vtprune" / "models" / "projector" / "projector.safetensors"))
)
enc = tp.Encoder(processor)
pad = processor.tokenizer.pad_token_id
yes_id, no_id = enc.answer_ids("Yes")[0], enc.answer_ids("No")[0]
erng = random.Random(1)
items = []
for i in ho:
    items.append((i, f"Is there a {labels[i]} in the image?", "Yes"))
    j = erng.choice([k for k in ho if labels[k] != labels[i]])
    items.append((i, f"Is there a {labels[j]} in the image?", "No"))
feats = {i: tp.pool_tokens(data["feats"][i][None].float())[0] for i in ho}


with torch.no_grad():  # evaluate sizes each prompt's image tokens from the features (49 here)
    acc, py, _ = tp.evaluate(model, enc, feats, items, yes_id, no_id, pad)
print("49-token held-out acc", acc, "P(yes)", py)
