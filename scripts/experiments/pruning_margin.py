#!/usr/bin/env python
"""Why the bundled model answers "No" once visual tokens are pruned: the yes/no margin under pruning.

For the first N imagenet-pope questions (held-out images), the margin logit(" Yes") - logit(" No") of the
first answer token, unpruned and under a few methods at one budget. Prints, per condition, the mean margin
on positive and negative questions, the accuracy at threshold 0, and the AUC of the margin (whether the
margin still separates positives from negatives). A shift of both means with the AUC kept says the
evidence is still there and only the decision threshold moved (a calibration effect of fewer tokens).

Usage: python scripts/experiments/pruning_margin.py [--n 40] [--keep-ratio 0.25]
"""

from __future__ import annotations

import argparse

import torch

from vtprune.eval.calibrate import first_token_logprobs
from vtprune.eval.datasets import load_dataset
from vtprune.inputs import build_batch
from vtprune.models import load_default


def auc(pos: list[float], neg: list[float]) -> float:
    pairs = [(p > q) + 0.5 * (p == q) for p in pos for q in neg]
    return sum(pairs) / len(pairs)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=40)
    ap.add_argument("--keep-ratio", type=float, default=0.25)
    ap.add_argument("--batch", type=int, default=10)
    args = ap.parse_args()
    model, processor = load_default()
    tok = processor.tokenizer
    yes, no = (tok.convert_tokens_to_ids(t) for t in ("ĠYes", "ĠNo"))
    samples = load_dataset("imagenet-pope", limit=args.n)
    conds = [("none", {}), ("random", {"keep_ratio": args.keep_ratio}), ("pool", {"keep_ratio": args.keep_ratio}),
             ("parvts", {"keep_ratio": args.keep_ratio}), ("fastv", {"keep_ratio": args.keep_ratio})]
    print(f"{args.n} imagenet-pope questions, keep_ratio {args.keep_ratio}")
    print("| method | mean margin (yes questions) | mean margin (no questions) | accuracy @0 | AUC |")
    print("|---|---:|---:|---:|---:|")
    for name, opts in conds:
        margins = []
        for i in range(0, len(samples), args.batch):
            chunk = samples[i:i + args.batch]
            inputs = build_batch(processor, [s.load_image() for s in chunk], [s.question for s in chunk])
            lp, _ = first_token_logprobs(model, inputs, name, **opts)
            margins += (lp[:, yes] - lp[:, no]).tolist()
        pos = [m for m, s in zip(margins, samples, strict=True) if s.answer == "yes"]
        neg = [m for m, s in zip(margins, samples, strict=True) if s.answer == "no"]
        acc = (sum(m > 0 for m in pos) + sum(m <= 0 for m in neg)) / len(margins)
        print(f"| {name} {opts or ''} | {torch.tensor(pos).mean():.2f} | {torch.tensor(neg).mean():.2f} | "
              f"{100 * acc:.0f} % | {auc(pos, neg):.2f} |")


if __name__ == "__main__":
    main()
