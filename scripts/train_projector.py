#!/usr/bin/env python
"""Train the LLaVA MLP projector of vtprune's bundled model (EfficientNet-Lite0 -> SmolLM2-135M).

Only the projector (Linear 2280->576, GELU, Linear 576->576) is trained; the tower and the language
model are frozen.  Each visual token is the tower's 1280 feature channels followed by its 1000-class
ImageNet posterior (``class_posterior`` in ``vtprune/models/efficientnet_tower.py``).  Feature-map
tokens are precomputed by ``scripts/prepare_projector_data.py``; the posterior is computed here.

Data
  * ImageNet sample (``../shared/data/imagenet-sample``, 1000 photos, one per class), FIXED split:
    ``random.Random(seed).shuffle(sorted files)``; first 80 % train, last 20 % held out.
    Train questions: "Is there a {label} in the image?" -> "Yes" / "No" (negatives: a random other
    train label, balanced 50/50) and "What is in the image?" -> "{label}".
  * easy-VQA train questions (PyPI ``easy_vqa``) on the images whose features were precomputed.
  * scenes (``vtprune.eval.datasets.scenes``) train-split questions about the subject, the background and the
    shapes at the edges (4th ``--mix`` weight; features from ``prepare_projector_data.py --scenes``);
    the test split's yes/no questions are the scene checks (``--scene-eval N`` per kind).

Initialisation (``--init classifier``): the projector starts as "posterior -> expected label word
embedding": linear_1 = [0 | L^T] with bias +c, linear_2 = I with bias -c (c = 5, where GELU(z) = z to
1e-6), L[k] = mean input embedding of the tokens of " {name of ImageNet class k}".  The 1000 class
names come from ``labels.jsonl`` (class k = k-th wnid in sorted order).

Training (``--trainable posterior-bias --yesno-loss bce``): only the posterior columns of linear_1 and
its bias get gradients (held-out classes' columns never do: their posterior mass is on their own class);
a yes/no question's loss is binary cross-entropy on logit(Yes) - logit(No) at the answer position,
other questions' loss is the answer tokens' cross-entropy.  Training the whole projector with
cross-entropy on everything lost the held-out discrimination (see ``projector/RECORD.md``).

Held-out evaluation: on the held-out 20 % images (classes never seen in training), "Is there a {label}
in the image?" with one positive and one seeded random negative per image; greedy first token, the
logit of "Yes" vs "No".

Writes ``<out>/projector.safetensors``, ``<out>/record.json`` and ``<out>/RECORD.md``.

Usage::

    python scripts/prepare_projector_data.py
    # the committed weights: four runs, each resumed from the previous one's last checkpoint (the
    # first three were stopped by hand at these step counts; lr is constant, so --steps N reproduces them)
    COMMON="--batch 8 --lr 1e-3 --schedule constant --yesno-loss bce --skip-init-eval"
    python scripts/train_projector.py $COMMON --steps 120 --mix 0.8,0.2,0 --trainable posterior --out /tmp/s1
    python scripts/train_projector.py $COMMON --steps 100 --mix 1,0,0 --trainable posterior \
        --resume /tmp/s1/projector.safetensors --out /tmp/s2
    python scripts/train_projector.py $COMMON --steps 60 --mix 1,0,0 --trainable posterior-bias \
        --resume /tmp/s2/projector.safetensors --out /tmp/s3
    python scripts/train_projector.py $COMMON --steps 400 --time-budget 1260 --mix 1,0,0 \
        --trainable posterior-bias --resume /tmp/s3/projector.safetensors --out /tmp/s4
    # stage 5b (the committed weights): token dropout, and the answer token's cross-entropy beside the
    # margin so that greedy decoding answers Yes / No (stopped by its time budget after 59 steps)
    python scripts/train_projector.py --batch 8 --lr 1e-3 --schedule constant --skip-init-eval --steps 59 \
        --mix 1,0,0 --trainable posterior-bias --yesno-loss bce+ce --drop-frac 0.5 --drop-keep 98,49,24,12 \
        --eval-keep 196,24 --resume /tmp/s4/projector.safetensors    # writes projector/
    # scenes (tried, not adopted: projector/RECORD.md): features, then --mix 0.5,0,0,0.5 --trainable linear1
    python scripts/prepare_projector_data.py --scenes
"""

from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import random
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

from vtprune.eval.datasets import split_imagenet  # noqa: E402  (the fixed split, shared with evaluation)
from vtprune.models.default import (  # noqa: E402
    IMAGE_TOKEN,
    NUM_IMAGE_TOKENS,
    PROJECTOR_DIR,
    assemble,
    cache_root,
)
from vtprune.models.efficientnet_tower import class_posterior  # noqa: E402

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"  # ../shared beside the repo
YES, NO = "Yes", "No"


def build_prompt(processor, question, n_image_tokens=NUM_IMAGE_TOKENS):
    msgs = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": question}]}]
    text = processor.apply_chat_template(msgs, add_generation_prompt=True, tokenize=False)
    return text.replace(IMAGE_TOKEN, IMAGE_TOKEN * n_image_tokens)


def pool_tokens(feats):
    """2x2 average pooling of tower tokens [B, 196, C] (14x14 grid) -> [B, 49, C] (7x7 grid): the
    cheap-sequence training samples (about 3x less LM work per sample than 196 tokens)."""
    b, n, c = feats.shape
    side = int(n**0.5)
    grid = feats.view(b, side, side, c).permute(0, 3, 1, 2)
    return torch.nn.functional.avg_pool2d(grid, 2).permute(0, 2, 3, 1).reshape(b, -1, c)


class Encoder:
    """Tokenises (question, answer) pairs; caches prompt ids."""

    def __init__(self, processor):
        self.p = processor
        self.tok = processor.tokenizer
        self.cache = {}

    def prompt_ids(self, q, n_image_tokens=NUM_IMAGE_TOKENS):
        if (q, n_image_tokens) not in self.cache:
            text = build_prompt(self.p, q, n_image_tokens)
            self.cache[q, n_image_tokens] = self.tok(text, add_special_tokens=False)["input_ids"]
        return self.cache[q, n_image_tokens]

    def answer_ids(self, a):
        # the template renders an answer as " {answer}" + newline (see CHAT_TEMPLATE)
        return self.tok(" " + a + "\n", add_special_tokens=False)["input_ids"]


def make_batch(enc, samples, pad_id, n_image_tokens=NUM_IMAGE_TOKENS):
    """samples: list of (feat_index_key, question, answer or None). Returns ids, attn, labels (left pad)."""
    seqs, labs = [], []
    for _, q, a in samples:
        p = enc.prompt_ids(q, n_image_tokens)
        if a is None:
            seqs.append(p)
            labs.append([-100] * len(p))
        else:
            ans = enc.answer_ids(a)
            seqs.append(p + ans)
            labs.append([-100] * len(p) + ans)
    n = max(len(s) for s in seqs)
    ids = torch.full((len(seqs), n), pad_id, dtype=torch.long)
    att = torch.zeros((len(seqs), n), dtype=torch.long)
    lab = torch.full((len(seqs), n), -100, dtype=torch.long)
    for i, (s, lb) in enumerate(zip(seqs, labs, strict=True)):
        ids[i, n - len(s) :] = torch.tensor(s)
        att[i, n - len(s) :] = 1
        lab[i, n - len(s) :] = torch.tensor(lb)
    return ids, att, lab


def tower_tokens(model, feats):
    """Tower output tokens from precomputed feature-map tokens: ``[B, N, 1280]`` -> ``[B, N, 2280]``
    (features followed by the class posterior, exactly as the tower's forward builds them)."""
    tower = model.model.vision_tower
    return torch.cat([feats, class_posterior(tower, feats)], dim=-1)


def subset_tokens(feats, k, generator=None):
    """A random subset of ``k`` of the N tower tokens of each row, in grid order: the training view of a
    pruned image.  ``feats`` [B, N, C] -> (``[B, k, C]``, original token indices ``[B, k]``)."""
    b, n, _ = feats.shape
    idx = torch.stack([torch.randperm(n, generator=generator)[:k].sort().values for _ in range(b)])
    return torch.gather(feats, 1, idx.unsqueeze(-1).expand(-1, -1, feats.shape[-1])), idx


def positions(ids, att, image_token_id, token_idx=None, n_tokens=NUM_IMAGE_TOKENS):
    """Position ids of left-padded rows; with ``token_idx`` [B, k] (the kept tokens' original indices) the
    kept image tokens sit at their original positions and the text after them where it was with all
    ``n_tokens`` present, as vtprune's engine keeps them after pruning."""
    pos = (att.cumsum(-1) - 1).clamp(min=0)
    if token_idx is None:
        return pos
    is_img = ids == image_token_id
    k = token_idx.shape[1]
    extra = torch.zeros_like(pos)
    extra[is_img] = (token_idx - torch.arange(k)).reshape(-1)
    after = (is_img.cumsum(-1) == k) & ~is_img
    extra[after] = n_tokens - k
    return pos + extra


def forward(model, ids, att, feats, logits_to_keep=0, token_idx=None):
    """Stock Llava forward path with precomputed feature-map tokens ``feats`` [B, N, 1280].

    ``logits_to_keep=k > 0`` computes the LM-head logits of the last k positions only; ``token_idx``
    [B, N]: the tokens are a subset, at these original indices (see ``positions``)."""
    emb = model.get_input_embeddings()(ids)
    img = model.model.multi_modal_projector(tower_tokens(model, feats.float()).to(emb.dtype))
    mask = (ids == model.config.image_token_id).unsqueeze(-1).expand_as(emb)
    emb = emb.masked_scatter(mask, img.reshape(-1, img.shape[-1]).to(emb.dtype))
    pos = positions(ids, att, model.config.image_token_id, token_idx)
    return model(inputs_embeds=emb, attention_mask=att, position_ids=pos, use_cache=False,
                 logits_to_keep=logits_to_keep)


def training_loss(model, enc, batch, feats, pad_id, yes_id, no_id, yesno_loss="bce", token_idx=None):
    """Mean loss over a batch of (key, question, answer).

    With ``yesno_loss="bce"`` a yes/no question contributes binary cross-entropy on
    ``logit(Yes) - logit(No)`` at the answer position (only the decision is trained, not the rest of
    the vocabulary); ``"bce+ce"`` adds the answer token's cross-entropy over the vocabulary (so that
    greedy decoding answers Yes / No); every other question contributes its answer tokens' cross-entropy.
    """
    is_yn = [yesno_loss in ("bce", "bce+ce") and a in (YES, NO) for _, _, a in batch]
    ids, att, lab = make_batch(enc, [(k, q, None if yn else a) for (k, q, a), yn in zip(batch, is_yn, strict=True)],
                               pad_id, feats.shape[1])
    # rows are left-padded, so every answer lies in the last (longest answer + 1) positions
    keep = 1 + max([len(enc.answer_ids(a)) for (_, _, a), yn in zip(batch, is_yn, strict=True) if not yn] or [0])
    logits = forward(model, ids, att, feats, logits_to_keep=keep, token_idx=token_idx).logits  # [B, keep, vocab]
    lab = lab[:, lab.shape[1] - keep + 1 :]  # targets of the first keep - 1 kept positions
    per_item = []
    for b, ((_, _, a), yn) in enumerate(zip(batch, is_yn, strict=True)):
        if yn:  # the prompt ends the row: its last position predicts the answer
            d = logits[b, -1, yes_id] - logits[b, -1, no_id]
            loss = torch.nn.functional.binary_cross_entropy_with_logits(d, d.new_tensor(float(a == YES)))
            if yesno_loss == "bce+ce":  # and the answer token over the whole vocabulary: generation answers Yes / No
                target = torch.tensor(yes_id if a == YES else no_id, device=logits.device)
                loss = loss + torch.nn.functional.cross_entropy(logits[b, -1], target)
            per_item.append(loss)
        else:
            per_item.append(torch.nn.functional.cross_entropy(logits[b, :-1], lab[b], ignore_index=-100))
    return torch.stack(per_item).mean()


def label_embedding(model, tok, label):
    ids = tok(" " + label, add_special_tokens=False)["input_ids"]
    return model.get_input_embeddings().weight[ids].mean(0)


@torch.no_grad()
def classifier_init(model, tok, class_names, offset=5.0):
    """Set the projector to map a token's class posterior p to sum_k p_k L[k] (see module docstring)."""
    L = torch.stack([label_embedding(model, tok, name) for name in class_names])  # [1000, 576]
    proj = model.model.multi_modal_projector
    n_feat = proj.linear_1.in_features - L.shape[0]
    w1 = torch.zeros_like(proj.linear_1.weight)
    w1[:, n_feat:] = L.T
    proj.linear_1.weight.copy_(w1)
    proj.linear_1.bias.fill_(offset)
    proj.linear_2.weight.copy_(torch.eye(proj.linear_2.out_features))
    proj.linear_2.bias.fill_(-offset)


@torch.no_grad()
def evaluate(model, enc, feats, items, yes_id, no_id, pad_id, batch=8, keep=NUM_IMAGE_TOKENS):
    """items: list of (feat_idx, question, gold 'Yes'/'No'). Returns (accuracy (logit of "Yes" vs "No"),
    fraction predicted yes, fraction whose greedy first token over the whole vocabulary is "Yes" or
    "No", i.e. what generation answers).  ``keep < 196``: each question sees a random subset of ``keep`` tokens (seeded, the same
    subsets on every call), at their original positions."""
    model.eval()
    correct = n_yes = n_format = 0
    gen = torch.Generator().manual_seed(1234)
    for i in range(0, len(items), batch):
        chunk = items[i : i + batch]
        f = torch.stack([feats[k] for k, _, _ in chunk]).float()
        idx = None
        if keep < f.shape[1]:
            f, idx = subset_tokens(f, keep, gen)
        ids, att, _ = make_batch(enc, [(k, q, None) for k, q, _ in chunk], pad_id, f.shape[1])
        logits = forward(model, ids, att, f, logits_to_keep=1, token_idx=idx).logits[:, -1]
        pred_yes = logits[:, yes_id] > logits[:, no_id]
        top = logits.argmax(-1)
        n_format += int(((top == yes_id) | (top == no_id)).sum())
        for (_, _, gold), py in zip(chunk, pred_yes.tolist(), strict=True):
            correct += int(py == (gold == YES))
            n_yes += int(py)
    n = max(1, len(items))
    return correct / n, n_yes / n, n_format / n


def _other_running_processes():
    me, n = os.getpid(), 0
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == me:
            continue
        try:
            with open(f"/proc/{pid}/stat") as f:
                state = f.read().rsplit(")", 1)[1].split()[0]
        except (OSError, IndexError):
            continue
        n += state == "R"
    return n


def adaptive_threads(max_threads):
    """Pick the torch thread count for the next step from the other processes currently running.

    On a shared 2-core machine, 2 intra-op threads competing with another busy process are several
    times slower than 1 thread, so use ``max_threads`` only when no other process is running.
    """
    try:
        counts = []
        for _ in range(5):
            counts.append(_other_running_processes())
            time.sleep(0.01)
    except OSError:
        return max_threads
    return max_threads if sorted(counts)[len(counts) // 2] == 0 else 1


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--features", default=str(cache_root() / "projector-features.pt"))
    ap.add_argument("--data", default=str(SHARED_DATA), help="../shared/data beside the repository")
    ap.add_argument("--out", default=str(PROJECTOR_DIR))
    ap.add_argument("--steps", type=int, default=400)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--lr", type=float, default=2e-4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--init", choices=["classifier", "random"], default="classifier")
    ap.add_argument("--mix", default="0.5,0.25,0.25",
                    help="fractions yes/no, what-is, easy-VQA[, scenes] (the 4th needs --scenes-features)")
    ap.add_argument("--scenes-features", default=str(cache_root() / "scenes-features.pt"),
                    help="scenes train / test features (prepare_projector_data.py --scenes)")
    ap.add_argument("--scene-eval", type=int, default=0,
                    help="held-out scene checks: the first N test-split yes/no questions of each kind (0: none)")
    ap.add_argument("--time-budget", type=float, default=0, help="stop training after this many seconds (0: off)")
    ap.add_argument("--eval-max", type=int, default=0, help="cap held-out questions (0: all)")
    ap.add_argument("--eval-every", type=int, default=0)
    ap.add_argument("--threads", type=int, default=2, help="max torch threads (adaptive, see adaptive_threads)")
    ap.add_argument("--skip-init-eval", action="store_true")
    ap.add_argument("--save-every", type=int, default=50)
    ap.add_argument("--no-write", action="store_true")
    ap.add_argument("--resume", default=None, help="start from these projector weights (safetensors) instead of --init")
    ap.add_argument("--trainable", choices=["all", "linear1", "posterior", "posterior-bias", "shared"],
                    default="posterior-bias",
                    help="posterior: only linear_1's class-posterior columns; posterior-bias: those and "
                         "linear_1's bias, a shift shared by every token (the probe that kept held-out "
                         "discrimination trained exactly these); shared: linear_1's bias and linear_2, the parameters "
                         "every class shares, with the per-class columns frozen at their init; linear1: all of "
                         "linear_1 (feature and posterior columns, bias): what colours and shapes need; all: the "
                         "whole projector")
    ap.add_argument("--yesno-loss", choices=["bce", "ce", "bce+ce"], default="bce",
                    help="bce: binary cross-entropy on logit(Yes) - logit(No) for yes/no questions; "
                         "ce: cross-entropy over the vocabulary like the other questions; bce+ce: both (the "
                         "margin, and Yes / No above every other token, which bce alone leaves free)")
    ap.add_argument("--schedule", choices=["constant", "linear"], default="constant")
    ap.add_argument("--clip", type=float, default=0.0, help="gradient-norm clip (0: off)")
    ap.add_argument("--pool-frac", type=float, default=0.0,
                    help="fraction of steps trained on 2x2-pooled tower tokens (49 instead of 196 tokens)")
    ap.add_argument("--drop-frac", type=float, default=0.0,
                    help="token dropout: fraction of steps trained on a random subset of the 196 tokens, kept at "
                         "their original positions (what pruning leaves); the subset size is drawn from --drop-keep")
    ap.add_argument("--drop-keep", default="98,49,24,12", help="subset sizes for --drop-frac (tokens)")
    ap.add_argument("--eval-keep", default="196",
                    help="token counts the held-out checks run at (random subsets below 196), e.g. 196,24")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    rng = random.Random(args.seed)
    t_start = time.time()

    data = torch.load(args.features)
    inet = data["imagenet"]
    files, labels = inet["files"], inet["labels"]
    class_names = [labels[i] for i in sorted(range(len(files)), key=lambda i: inet["wnids"][i])]
    feats = {("in", i): inet["feats"][i] for i in range(len(files))}
    tr, ho = split_imagenet(files, args.seed)
    print(f"imagenet: {len(tr)} train / {len(ho)} held-out images", flush=True)
    evqa = []
    if "easyvqa" in data:
        import easy_vqa

        qs, ans, img_ids = easy_vqa.get_train_questions()
        have = {iid: j for j, iid in enumerate(data["easyvqa"]["ids"])}
        for q, a, iid in zip(qs, ans, img_ids, strict=True):
            if iid in have:
                a = a.capitalize() if a in ("yes", "no") else a
                evqa.append((("ev", have[iid]), q, a))
        for j in have.values():
            feats[("ev", j)] = data["easyvqa"]["feats"][j]
    print(f"easy-VQA: {len(evqa)} questions on {len(data.get('easyvqa', {}).get('ids', []))} images", flush=True)
    mix = [float(x) for x in args.mix.split(",")]
    scene_train, scene_checks = [], {}
    if (len(mix) > 3 and mix[3] > 0) or args.scene_eval:
        scenes = torch.load(args.scenes_features)
        for split, tag in (("train", "sc"), ("test", "sct")):
            for i, f in enumerate(scenes[split]["feats"]):
                feats[(tag, i)] = f
        for s, q, a, _kind, qtype in scenes["train"]["questions"]:
            scene_train.append((("sc", s), q, a.capitalize() if qtype == "yes/no" else a))
        for s, q, a, kind, qtype in scenes["test"]["questions"]:
            if qtype == "yes/no" and len(scene_checks.setdefault(kind, [])) < args.scene_eval:
                scene_checks[kind].append((("sct", s), q, a.capitalize()))
        print(f"scenes: {len(scene_train)} train questions on {len(scenes['train']['feats'])} scenes; "
              f"checks {({k: len(v) for k, v in scene_checks.items()})}", flush=True)
        del scenes

    model, processor = assemble(None)
    tok = processor.tokenizer
    enc = Encoder(processor)
    pad_id = tok.pad_token_id
    yes_id = enc.answer_ids(YES)[0]
    no_id = enc.answer_ids(NO)[0]
    for p in model.parameters():
        p.requires_grad_(False)
    proj = model.model.multi_modal_projector
    n_feat = model.config.vision_config.hidden_size - len(class_names)  # feature channels before the posterior
    if args.trainable == "all":
        for p in proj.parameters():
            p.requires_grad_(True)
    elif args.trainable == "linear1":
        for p in proj.linear_1.parameters():
            p.requires_grad_(True)
    elif args.trainable == "shared":  # held-out classes' columns get no gradient anyway: train what all share
        for p in (proj.linear_1.bias, *proj.linear_2.parameters()):
            p.requires_grad_(True)
    else:  # only the posterior columns of linear_1: the features' columns get zero gradient
        proj.linear_1.weight.requires_grad_(True)
        proj.linear_1.bias.requires_grad_(args.trainable == "posterior-bias")
        col_mask = torch.zeros_like(proj.linear_1.weight)
        col_mask[:, n_feat:] = 1.0
        proj.linear_1.weight.register_hook(lambda g: g * col_mask)
    params = [p for p in proj.parameters() if p.requires_grad]

    # held-out yes/no set: one positive + one seeded negative (another held-out label) per image
    erng = random.Random(args.seed + 1)
    eval_items = []
    for i in ho:
        eval_items.append((("in", i), f"Is there a {labels[i]} in the image?", YES))
        j = erng.choice([k for k in ho if labels[k] != labels[i]])
        eval_items.append((("in", i), f"Is there a {labels[j]} in the image?", NO))
    if args.eval_max:
        eval_items = eval_items[: args.eval_max]
    quick_eval = eval_items[:100]  # 50 held-out images: their positive and negative questions

    record = {"init": args.init if not args.resume else f"resume:{Path(args.resume).name}",
              "pool_frac": args.pool_frac, "drop_frac": args.drop_frac, "drop_keep": args.drop_keep}
    drop_keep = [int(x) for x in args.drop_keep.split(",")]
    eval_keep = [int(x) for x in args.eval_keep.split(",")]

    def check(items, label):
        out = {}
        for k in eval_keep:
            t0 = time.time()
            acc, py, fmt = evaluate(model, enc, feats, items, yes_id, no_id, pad_id, keep=k)
            print(f"{label} held-out acc {acc:.3f} at {k} tokens on {len(items)} questions "
                  f"(P(pred yes)={py:.2f}; greedy answer Yes/No {fmt:.2f}) [{time.time() - t0:.0f}s]", flush=True)
            out[k] = {"accuracy": acc, "frac_pred_yes": py, "frac_answer_yes_or_no": fmt}
        return out
    if args.resume:
        from safetensors.torch import load_file

        proj.load_state_dict(load_file(args.resume))
        print(f"resumed projector from {args.resume}", flush=True)
    elif args.init == "classifier":
        classifier_init(model, tok, class_names)
    acc0 = None
    if not args.skip_init_eval:
        init = check(quick_eval, "step 0 quick")
        acc0 = init[eval_keep[0]]["accuracy"]
        record["heldout_quick_at_init"] = init
        record["scene_checks_at_init"] = {k: check(v, f"step 0 scenes {k}") for k, v in scene_checks.items()}

    def save_projector():
        from safetensors.torch import save_file

        Path(args.out).mkdir(parents=True, exist_ok=True)
        save_file({k: v.detach().contiguous() for k, v in proj.state_dict().items()},
                  str(Path(args.out) / "projector.safetensors"), metadata={"format": "pt"})

    def sample():
        r = rng.random()
        m = mix
        if len(m) > 3 and r >= m[0] + m[1] + m[2]:
            return rng.choice(scene_train)
        if r < m[0] or (not evqa and r < m[0] + m[2]):
            i = rng.choice(tr)
            if rng.random() < 0.5:
                return (("in", i), f"Is there a {labels[i]} in the image?", YES)
            j = rng.choice(tr)
            while labels[j] == labels[i]:
                j = rng.choice(tr)
            return (("in", i), f"Is there a {labels[j]} in the image?", NO)
        if r < m[0] + m[1] or not evqa:
            i = rng.choice(tr)
            return (("in", i), "What is in the image?", labels[i])
        return rng.choice(evqa)

    opt = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.0)
    if args.schedule == "linear":
        sched = torch.optim.lr_scheduler.LambdaLR(
            opt, lambda s: min(1.0, (s + 1) / 10) * max(0.05, 1 - s / max(1, args.steps))
        )
    else:
        sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0)
    losses, steps_done, thread_hist = [], 0, {}
    t_train = time.time()
    for step in range(1, args.steps + 1):
        model.train()
        nthreads = adaptive_threads(args.threads)
        if nthreads != torch.get_num_threads():
            torch.set_num_threads(nthreads)
        thread_hist[nthreads] = thread_hist.get(nthreads, 0) + 1
        batch = [sample() for _ in range(args.batch)]
        f = torch.stack([feats[k] for k, _, _ in batch]).float()
        idx = None
        if rng.random() < args.pool_frac:
            f = pool_tokens(f)
        elif args.drop_frac and rng.random() < args.drop_frac:  # no draw when off: old runs replay
            f, idx = subset_tokens(f, rng.choice(drop_keep))
        loss = training_loss(model, enc, batch, f, pad_id, yes_id, no_id, args.yesno_loss, idx)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        if args.clip:
            torch.nn.utils.clip_grad_norm_(params, args.clip)
        opt.step()
        sched.step()
        losses.append(float(loss.detach()))
        steps_done = step
        el = time.time() - t_train
        if step % 5 == 0 or step == 1:
            print(f"step {step} loss {sum(losses[-20:]) / len(losses[-20:]):.3f} "
                  f"({el / step:.2f}s/step, {el:.0f}s, threads {nthreads})", flush=True)
        if args.eval_every and step % args.eval_every == 0:
            check(quick_eval, f"step {step} quick")
            for k, v in scene_checks.items():
                check(v, f"step {step} scenes {k}")
        if args.save_every and step % args.save_every == 0 and not args.no_write:
            save_projector()  # intermediate checkpoint (overwritten at the end)
        if args.time_budget and el > args.time_budget:
            print(f"time budget reached after {step} steps", flush=True)
            break
    train_s = time.time() - t_train

    out_dir = Path(args.out)
    if not args.no_write:
        save_projector()
        print("wrote", out_dir / "projector.safetensors", flush=True)
    torch.set_num_threads(adaptive_threads(args.threads))
    final = check(eval_items, "FINAL")
    final_scenes = {k: check(v, f"FINAL scenes {k}") for k, v in scene_checks.items()}
    acc, py = final[eval_keep[0]]["accuracy"], final[eval_keep[0]]["frac_pred_yes"]
    final_loss = sum(losses[-20:]) / max(1, len(losses[-20:]))
    record.update({
        "model": "EfficientNet-Lite0 (ImageNet) -> LlavaMultiModalProjector -> SmolLM2-135M-Instruct (GGUF Q4_1)",
        "trained": "projector only (tower and LM frozen)", "tokens": "1280 EfficientNet features + 1000-class posterior (T=0.1, local weight 0.5)",
        "data": {
            "imagenet_sample": f"{args.data}/imagenet-sample ({len(files)} photos, one per class)",
            "imagenet_split": {"seed": args.seed, "rule": "random.Random(seed).shuffle(indices sorted by file); "
                               "first 80% train, rest held out", "n_train": len(tr), "n_heldout": len(ho),
                               "heldout_files": [files[i] for i in ho]},
            "easy_vqa": {"images": len(data.get("easyvqa", {}).get("ids", [])), "questions": len(evqa),
                         "image_ids": "first N sorted train image ids"},
            "mix_yesno_what_easyvqa_scenes": args.mix,
            "scenes": {"train_questions": len(scene_train), "features": args.scenes_features} if scene_train else None,
        },
        "steps": steps_done, "batch": args.batch, "lr": args.lr, "optimizer": f"AdamW, {args.schedule} lr" + (f", clip {args.clip}" if args.clip else ""),
        "trainable": args.trainable, "yesno_loss": args.yesno_loss,
        "seed": args.seed, "train_seconds": round(train_s, 1), "total_seconds": round(time.time() - t_start, 1),
        "final_loss_last20": final_loss,
        "heldout_eval": {"questions": len(eval_items), "accuracy": acc, "frac_pred_yes": py,
                         "by_tokens": final,
                         "scenes_test_yesno": final_scenes,
                         "protocol": "Is there a {label} in the image?; 1 positive + 1 seeded (seed+1) random "
                                     "held-out negative per held-out image; first-token logit Yes vs No; "
                                     "unpruned model (by_tokens: random token subsets of that size, seeded, at "
                                     "their original positions)"},
        "date": _dt.datetime.now(_dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ"),
        "command": "python " + " ".join([Path(sys.argv[0]).as_posix(), *sys.argv[1:]]),
        "threads": args.threads, "steps_per_thread_count": thread_hist,
    })
    print(json.dumps({k: v for k, v in record.items() if k != "data"}, indent=1), flush=True)
    if not args.no_write:
        (out_dir / "record.json").write_text(json.dumps(record, indent=1) + "\n")
        md = [
            "# Projector training record", "",
            f"- model: {record['model']}", f"- trained: {record['trained']}",
            f"- data: ImageNet sample {len(tr)} train / {len(ho)} held-out images (split seed {args.seed}); "
            f"easy-VQA {record['data']['easy_vqa']['questions']} questions on "
            f"{record['data']['easy_vqa']['images']} images; mix {args.mix}",
            f"- init: {record['init']}; fraction of steps on 2x2-pooled tokens: {args.pool_frac}; on random "
            f"token subsets (token dropout, sizes {args.drop_keep}): {args.drop_frac}",
            "- held-out yes/no accuracy by visual tokens present: " + ", ".join(
                f"{k} tokens {v['accuracy']:.3f} (predicted yes {v['frac_pred_yes']:.2f})" for k, v in final.items()),
            *[f"- scenes test yes/no, {kind} ({len(scene_checks[kind])} questions): " + ", ".join(
                f"{k} tokens {v['accuracy']:.3f} (predicted yes {v['frac_pred_yes']:.2f})" for k, v in res.items())
              for kind, res in final_scenes.items()],
            f"- trained parameters: {args.trainable}; yes/no loss: {args.yesno_loss}; {record['optimizer']}",
            f"- steps {steps_done}, batch {args.batch}, lr {args.lr}, {train_s:.0f} s training on a shared 2-core CPU "
            f"(max {args.threads} torch threads, adaptive; steps per thread count {thread_hist})",
            f"- final loss (mean of last 20 steps): {final_loss:.3f}",
            f"- held-out yes/no accuracy: {acc:.3f} on {len(eval_items)} questions (fraction predicted yes {py:.2f})"
            + (f"; at init (quick subset): {acc0:.3f}" if acc0 is not None else ""),
            f"- date: {record['date']}", f"- command: `{record['command']}`", "",
            "Held-out images belong to classes never seen in training; the list is in record.json.", "",
        ]
        (out_dir / "RECORD.md").write_text("\n".join(md))


if __name__ == "__main__":
    main()
