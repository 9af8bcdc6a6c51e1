#!/usr/bin/env python
"""The migration probe: do the question tokens carry what pruning removes from the image?

ParVTS's claim (Zhan et al. 2025, arXiv 2511.18875) is that running the non-subject visual tokens as a
parallel path for the first K layers lets their information migrate into the question tokens before the
path is dropped. This measures it directly, whether or not the model can say the word: a linear probe
(scikit-learn's logistic regression on standardised features, its inverse regularisation C chosen by 5-fold
cross-validation on the training scenes) reads, from the question tokens' hidden states, (a) the
background colour of a scene (scenes with a flat, striped, checkered or noise background: 11 colours) and
(b) whether any small shape sits at the image's edges (all scenes). It is fitted on ``scenes`` train
scenes and scored on held-out ``scenes`` test scenes (other subjects, other background draws).

Question tokens: every text token after the image (the question, ``<|im_end|>`` and the assistant cue),
located by counting from the end of the sequence, since pruning shortens the sequence but never removes
text. Features: the mean of those tokens' hidden states (``--pool mean``, the table's default; ``last``:
the last token, also in the JSON). Layer ``l``: the output of decoder layer ``l`` (0-based; hooks on the
model's own decoder layers). ParVTS runs the two paths packed in one sequence in layers ``0 .. K-1`` and
fuses the question copies before layer K, so layers below K are not probed for it; the default layers
start at K = 3 (ParVTS's ``discard_layer``). One forward per scene and method (``generate`` with one new
token, a fixed question: ``--question``, default "Describe the image."), the method attached with
``vtprune.apply``.

Reference rows: the majority class of the test scenes, and the probe on the mean of the 196 projected
visual tokens (the LM's input, unpruned): what the image tokens themselves carry.

Default methods (``--methods``, spec grammar ``method[:k=v]@budget``): the unpruned model, ParVTS @ 12.5 %
(25 subject tokens), ParVTS with the non-subject path off (``fusion=fixed:alpha=1``: the question keeps
only the subject path's state), VisionZip's dominant tokens only at 12.5 % (saliency-only, the same 25
tokens ParVTS keeps), and at ParVTS's equivalent budget (42 of 196 tokens, mean over the 30 layers):
VisionZip dominant-only @ 42, FastV @ 31 (K = 2: (2 x 196 + 28 x 31) / 30 = 42) and random @ 42 (as
``scripts/accuracy_grid.sh`` matches them). Each run's measured equivalent budget is in the table.

Usage::

    python scripts/probe_migration.py --out benchmarks/results/<date>-probe-migration-<model> \\
        [--train 400 --test 200 --layers 3,6,10,15,22,29 --threads 1]

Writes ``probe.json`` (every method x layer x target x pooling: accuracy, n, 95 % Wilson interval, C),
``probe.md`` (the table) and ``probe.png`` (accuracy by layer per method and target) under ``--out``, and
caches each method's features in ``--out/features/`` (ignored by git): a rerun resumes. Needs
scikit-learn and matplotlib.

Source: reconstructed for this project (issue 23: the seeds' mechanism, measured); linear probes of hidden
states follow Alain & Bengio, "Understanding intermediate layers using linear classifier probes" (2016).
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import time
import warnings
from collections.abc import Iterable, Sequence
from pathlib import Path

import numpy as np
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "src"))

DEFAULT_METHODS = ("none", "parvts@12.5%", "parvts:fusion=fixed:alpha=1@12.5%", "visionzip:contextual=0@12.5%",
                   "visionzip:contextual=0@42", "fastv@31", "random@42")
TARGETS = ("background_color", "edge_shapes")
VISUAL = "visual tokens (LM input)"


# ------------------------------------------------------------------------------------------- features

def question_states(model, batches: Iterable[dict], spec: str, layers: Sequence[int], image_token_id: int,
                    visual: bool = False) -> dict[str, np.ndarray]:
    """The question tokens' hidden states after each of ``layers``, under the method ``spec``.

    Args:
        model: a model ``vtprune.apply`` supports, in eval mode.
        batches: model inputs (``input_ids`` / ``attention_mask`` [B, S] left-padded, pixel values, ...),
            one image per sample.
        spec: a method spec (``"none"``, ``"parvts@12.5%"``, ``"fastv@31"``; :mod:`vtprune.methods.spec`).
        layers: decoder layer indices (0-based); the output of each is read by a forward hook.
        image_token_id: the id of the image placeholder tokens in ``input_ids``.
        visual: also return the mean of the visual tokens at the LM's input (unpruned: for ``"none"``).

    Returns:
        ``{"mean": [N, len(layers), D], "last": [N, len(layers), D], "equivalent_budget": [N]}`` float32
        numpy arrays (plus ``"visual": [N, D]``): per sample the mean over its T question tokens (every
        token after its last image token, counted from the end of the layer's output) and the last token.

    Raises:
        ValueError: a spec or an option the method or the model does not accept; a layer out of range.
    """
    from vtprune.api import apply
    from vtprune.methods.spec import parse_spec

    s = parse_spec(spec)
    decoder = _decoder_layers(model)
    bad = [k for k in layers if not 0 <= k < len(decoder)]
    if bad:
        raise ValueError(f"layers {bad} out of range: the model has {len(decoder)} decoder layers (0-based)")
    caught: dict[int, torch.Tensor] = {}
    inputs_caught: list[torch.Tensor] = []

    def grab(layer):
        def hook(_module, _args, output):
            if layer not in caught:  # the prefill call only
                caught[layer] = (output[0] if isinstance(output, tuple) else output).detach().float()
        return hook

    def grab_input(_module, args, kwargs):
        if not inputs_caught:
            inputs_caught.append((args[0] if args else kwargs["hidden_states"]).detach().float())

    handles = [decoder[k].register_forward_hook(grab(k)) for k in layers]
    if visual:
        handles.append(decoder[0].register_forward_pre_hook(grab_input, with_kwargs=True))
    out: dict[str, list] = {"mean": [], "last": [], "equivalent_budget": [], "visual": []}
    try:
        for inputs in batches:
            caught.clear()
            inputs_caught.clear()
            ids = inputs["input_ids"]
            is_image = ids == image_token_id
            if not bool(is_image.any(1).all()):
                raise ValueError("every sample needs an image (no image token in some row of input_ids)")
            last_image = torch.where(is_image, torch.arange(ids.shape[1]), -1).max(1).values
            n_question = (ids.shape[1] - 1 - last_image).tolist()
            with torch.no_grad(), apply(model, s.name, **s.options) as run:
                model.generate(**inputs, max_new_tokens=1, do_sample=False)
            report = run.report()
            out["equivalent_budget"] += [float(r["equivalent_budget"]) for r in report["samples"]]
            for key in ("mean", "last"):
                rows = []
                for b, t in enumerate(n_question):
                    per_layer = [caught[k][b, -t:] for k in layers]
                    rows.append(torch.stack([h.mean(0) if key == "mean" else h[-1] for h in per_layer]))
                out[key].append(torch.stack(rows).numpy())
            if visual:
                h0 = inputs_caught[0]
                out["visual"].append(torch.stack([h0[b][is_image[b]].mean(0) for b in range(len(ids))]).numpy())
    finally:
        for h in handles:
            h.remove()
    res = {"mean": np.concatenate(out["mean"]), "last": np.concatenate(out["last"]),
           "equivalent_budget": np.asarray(out["equivalent_budget"], dtype=np.float32)}
    if visual:
        res["visual"] = np.concatenate(out["visual"])
    return res


def _decoder_layers(model) -> torch.nn.ModuleList:
    """The language model's decoder layers (``model.model.language_model.layers`` in transformers v5)."""
    lm = getattr(getattr(model, "model", model), "language_model", None)
    if lm is None or not hasattr(lm, "layers"):
        raise TypeError(f"{type(model).__name__}: no model.language_model.layers (a transformers v5 multimodal model)")
    return lm.layers


# ---------------------------------------------------------------------------------------------- probe

def fit_probe(x_train: np.ndarray, y_train: Sequence, x_test: np.ndarray, y_test: Sequence, seed: int = 0) -> dict:
    """Fit a linear probe on ``x_train`` [N, D] and score it on ``x_test`` [M, D].

    The probe: scikit-learn ``StandardScaler`` then ``LogisticRegressionCV`` (L2, C among 1e-3 .. 10,
    5-fold stratified cross-validation on the training rows, lbfgs; multinomial for more than 2 classes).

    Returns:
        ``{"accuracy", "correct", "n", "low", "high"`` (95 % Wilson interval), ``"C"`` (the chosen C),
        ``"majority"`` (accuracy of always answering the training rows' most frequent class)}``.

    Raises:
        ImportError: scikit-learn is missing. ValueError: fewer than 2 classes in ``y_train``.
    """
    from sklearn.linear_model import LogisticRegressionCV
    from sklearn.model_selection import StratifiedKFold
    from sklearn.pipeline import make_pipeline
    from sklearn.preprocessing import StandardScaler

    from vtprune.eval.stats import wilson

    y_train, y_test = np.asarray(y_train), np.asarray(y_test)
    classes, counts = np.unique(y_train, return_counts=True)
    if len(classes) < 2:
        raise ValueError(f"a probe needs 2 or more classes in the training labels, got {classes.tolist()}")
    folds = max(2, min(5, int(counts.min())))
    clf = make_pipeline(StandardScaler(), LogisticRegressionCV(
        Cs=[1e-3, 1e-2, 1e-1, 1.0, 10.0], cv=StratifiedKFold(folds, shuffle=True, random_state=seed),
        scoring="accuracy", max_iter=3000))
    with warnings.catch_warnings():  # scikit-learn >= 1.9 announces renamed fitted attributes
        warnings.simplefilter("ignore", FutureWarning)
        clf.fit(x_train, y_train)
    pred = clf.predict(x_test)
    correct = int((pred == y_test).sum())
    low, high = wilson(correct, len(y_test))
    majority = float((y_test == classes[counts.argmax()]).mean())
    return {"accuracy": correct / len(y_test), "correct": correct, "n": int(len(y_test)), "low": low, "high": high,
            "C": float(np.atleast_1d(clf[-1].C_)[0]), "majority": majority}


def scene_targets(meta: dict) -> dict[str, str | None]:
    """The probe targets of one scene: its background colour (None for a photo background) and whether
    any small shape sits at its edges ("yes" / "no")."""
    return {"background_color": meta["background"]["color"], "edge_shapes": "yes" if meta["shapes"] else "no"}


# ----------------------------------------------------------------------------------------------- main

def _safe(spec: str) -> str:
    return re.sub(r"[^A-Za-z0-9.=_-]+", "_", spec)


def _scenes(split: str, n: int):
    from vtprune.eval.datasets.scenes import iter_scenes

    images, metas = [], []
    for _s, image, meta, _q in iter_scenes(split, n):
        images.append(image)
        metas.append(meta)
    return images, metas


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--out", required=True, help="results folder (probe.json / probe.md / probe.png, features/)")
    p.add_argument("--model", default=None, help="model id or path (default: the bundled model)")
    p.add_argument("--methods", nargs="+", default=list(DEFAULT_METHODS), help="method specs, unpruned first")
    p.add_argument("--layers", default="3,6,10,15,22,29", help="decoder layers (0-based) whose output is probed")
    p.add_argument("--train", type=int, default=400, help="train scenes (the probe's fit)")
    p.add_argument("--test", type=int, default=200, help="held-out test scenes (the probe's score)")
    p.add_argument("--question", default="Describe the image.")
    p.add_argument("--pool", choices=("mean", "last"), default="mean", help="the table's pooling of the question tokens")
    p.add_argument("--batch", type=int, default=4)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--dtype", default="float32")
    args = p.parse_args()

    from vtprune.inputs import build_batch, load_model

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    (out / "features").mkdir(parents=True, exist_ok=True)
    layers = [int(x) for x in args.layers.split(",")]
    t0 = time.time()
    model, processor = load_model(args.model, getattr(torch, args.dtype), "cpu")
    tr_images, tr_meta = _scenes("train", args.train)
    te_images, te_meta = _scenes("test", args.test)
    images = tr_images + te_images
    n_train = len(tr_images)
    print(f"{len(tr_images)} train + {len(te_images)} test scenes built in {time.time() - t0:.0f}s", flush=True)
    timings = {}
    feats = {}
    for spec in args.methods:
        path = out / "features" / f"{_safe(spec)}.npz"
        if path.is_file():
            feats[spec] = dict(np.load(path))
            timings[spec] = float(feats[spec]["seconds"])
            print(f"{spec}: cached", flush=True)
            continue
        t1 = time.time()
        batches = (build_batch(processor, images[i : i + args.batch], [args.question] * len(images[i : i + args.batch]))
                   for i in range(0, len(images), args.batch))
        res = question_states(model, batches, spec, layers, model.config.image_token_id, visual=spec == "none")
        timings[spec] = time.time() - t1
        res["seconds"] = np.asarray(timings[spec])
        np.savez(path, **res)
        feats[spec] = res
        print(f"{spec}: {len(images)} scenes in {timings[spec]:.0f}s "
              f"(equivalent budget {res['equivalent_budget'].mean():.1f})", flush=True)

    targets = [scene_targets(m) for m in tr_meta + te_meta]
    rows = []
    for target in TARGETS:
        keep = np.array([t[target] is not None for t in targets])
        y = np.array([t[target] or "" for t in targets])
        tr = keep & (np.arange(len(y)) < n_train)
        te = keep & (np.arange(len(y)) >= n_train)
        if "none" in feats and "visual" in feats["none"]:
            r = fit_probe(feats["none"]["visual"][tr], y[tr], feats["none"]["visual"][te], y[te])
            rows.append({"method": VISUAL, "layer": None, "pool": "mean", "target": target, **r,
                         "equivalent_budget": 196.0})
        for spec, f in feats.items():
            for pool in ("mean", "last"):
                for j, layer in enumerate(layers):
                    r = fit_probe(f[pool][tr, j], y[tr], f[pool][te, j], y[te])
                    rows.append({"method": spec, "layer": layer, "pool": pool, "target": target, **r,
                                 "equivalent_budget": float(f["equivalent_budget"].mean())})
        print(f"probes of {target} fitted", flush=True)
    result = {"command": " ".join(sys.argv), "question": args.question, "layers": layers, "n_train": n_train,
              "n_test": len(te_images), "methods": list(feats), "seconds_per_method": timings,
              "seconds_total": time.time() - t0, "rows": rows}
    (out / "probe.json").write_text(json.dumps(result, indent=1) + "\n")
    (out / "probe.md").write_text(table(result, args.pool))
    plot(result, args.pool, out / "probe.png")
    print(table(result, args.pool))
    print(f"wrote {out / 'probe.json'}, probe.md, probe.png ({time.time() - t0:.0f}s in all)")


def table(result: dict, pool: str) -> str:
    """The markdown table: one row per method (and the visual-token reference), one column per layer and
    target: probe accuracy % [95 % CI]; n and the majority baseline in the header."""
    rows = [r for r in result["rows"] if r["pool"] == pool or r["method"] == VISUAL]
    lines = []
    for target in TARGETS:
        mine = [r for r in rows if r["target"] == target]
        if not mine:
            continue
        n, majority = mine[0]["n"], mine[0]["majority"]
        lines += [f"### {target.replace('_', ' ')}: n = {n} test scenes, majority class {100 * majority:.1f} %", "",
                  "| method | equiv. budget | " + " | ".join(f"layer {k}" for k in result["layers"]) + " |",
                  "|---|---:|" + "---:|" * len(result["layers"])]
        for method in [VISUAL, *result["methods"]]:
            cells = {r["layer"]: r for r in mine if r["method"] == method}
            if not cells:
                continue
            budget = f"{next(iter(cells.values()))['equivalent_budget']:.1f}"
            if method == VISUAL:
                r = cells[None]
                lines.append(f"| {method} | {budget} | " + " | ".join(
                    [f"{100 * r['accuracy']:.1f} [{100 * r['low']:.1f}, {100 * r['high']:.1f}]"] + [""] * (len(result["layers"]) - 1)) + " |")
                continue
            lines.append(f"| {method} | {budget} | " + " | ".join(
                f"{100 * cells[k]['accuracy']:.1f} [{100 * cells[k]['low']:.1f}, {100 * cells[k]['high']:.1f}]"
                for k in result["layers"]) + " |")
        lines.append("")
    return "\n".join(lines)


def plot(result: dict, pool: str, path: Path) -> None:
    """Accuracy by layer, one line per method with its 95 % interval, one panel per target."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(TARGETS), figsize=(6.2 * len(TARGETS), 4.2))
    for ax, target in zip(np.atleast_1d(axes), TARGETS, strict=True):
        mine = [r for r in result["rows"] if r["target"] == target]
        for method in result["methods"]:
            rs = sorted((r for r in mine if r["method"] == method and r["pool"] == pool), key=lambda r: r["layer"])
            if not rs:
                continue
            x = [r["layer"] for r in rs]
            ax.errorbar(x, [100 * r["accuracy"] for r in rs],
                        yerr=[[100 * (r["accuracy"] - r["low"]) for r in rs], [100 * (r["high"] - r["accuracy"]) for r in rs]],
                        marker="o", ms=3, capsize=2, lw=1, label=method)
        vis = [r for r in mine if r["method"] == VISUAL]
        if vis:
            ax.axhline(100 * vis[0]["accuracy"], color="k", ls=":", lw=1, label=VISUAL)
        if mine:
            ax.axhline(100 * mine[0]["majority"], color="gray", ls="--", lw=1, label="majority class")
            ax.set_title(f"{target.replace('_', ' ')} (n = {mine[0]['n']} held-out scenes)")
        ax.set(xlabel="decoder layer (output of)", ylabel=f"probe accuracy % ({pool} of question tokens)",
               ylim=(0, 100))
    np.atleast_1d(axes)[0].legend(fontsize=7)
    fig.suptitle(f"linear probe on the question tokens, question {result['question']!r}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


if __name__ == "__main__":
    main()
