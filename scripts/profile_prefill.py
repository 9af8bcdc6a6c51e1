#!/usr/bin/env python
"""Where a method's prefill (TTFT) time goes that the roofline does not predict.

For each case (``stock``, then method specs such as ``parvts@64``) one prefill (``generate`` with one new
token) of a random-weight architecture (``vtprune.bench.archs``) runs under ``torch.profiler``; its CPU
time is grouped by kind of op (matrix products, attention kernels, gathers / index copies, masks,
element-wise work, other) and compared with the stock prefill. A second part times one decoder layer's
forward, alone, at the token counts the methods leave (``--layer-tokens``; SDPA with its causal kernel),
to show how the matrix rate falls with fewer tokens: the roofline-ideal assumes every layer runs at the
square-matmul peak, which a layer of 120 tokens does not reach on a CPU.

Usage::

    python scripts/profile_prefill.py --arch llava-1.5-7b --dtype bfloat16 \\
        --cases stock,none,parvts@64,st3@64,fastv@64 --layer-tokens 636,336,256,192,124 --out OUT.md

Prints Markdown (and writes it to ``--out``). Timings are wall clock on this machine; the profile adds
overhead of its own, so compare the shares, not the absolute times, with ``vtprune bench``.

With ``--bench BENCH.json`` (a ``vtprune bench`` result of the same architecture and dtype) the script
instead predicts every case's TTFT from layer timings: each case runs once under vtprune to read the
real tokens (and packed paths) in every decoder layer's prefill (``tokens_per_layer_prefill`` /
``paths_per_layer_prefill`` of its report), every case's TTFT is timed here (round-robin), one decoder
layer is timed alone at each of those sizes (a packed two-path layer with an explicit mask, as the engine
runs it), and the prediction is stock's TTFT minus stock's layers plus the case's. The bench result gives
the cases and their roofline-ideal speedups. Measured / predicted near 1 would say the gap to the
roofline is the kernels' rate at that size; well below 1, that time is lost elsewhere (vtprune's scoring,
gathers, masks). Not yet validated: on the 2-core VM (2026-12-02) two runs disagreed with each other (a
636-token 7B layer alone at 369 and 178 ms) and layers timed alone came out slower than inside the model,
so read its output as a lead, not a figure::

    python scripts/profile_prefill.py --arch llava-1.5-7b --dtype bfloat16 \\
        --bench benchmarks/results/.../bench-b1-p60-n1-bfloat16.json --out OUT.md
"""

from __future__ import annotations

import argparse
import collections
import datetime
import json
import os
import platform
import time
from pathlib import Path
from typing import Any

import torch

from vtprune import api
from vtprune.bench import archs, measure
from vtprune.bench.inputs import synthetic_inputs
from vtprune.bench.runner import generation_config
from vtprune.methods import parse_spec

KINDS = {  # op-name fragments -> kind (first match wins)
    "matmul": ("aten::mm", "aten::addmm", "aten::bmm", "aten::linear", "aten::matmul", "aten::baddbmm"),
    "attention": ("scaled_dot_product", "flash_attention", "aten::_softmax", "aten::softmax"),
    "gather / index": ("aten::gather", "aten::index", "aten::index_select", "aten::scatter", "aten::take",
                       "aten::searchsorted", "aten::sort", "aten::topk", "aten::argsort"),
    "mask": ("aten::le", "aten::lt", "aten::ge", "aten::eq", "aten::ne", "aten::bitwise", "aten::logical",
             "aten::masked_fill", "aten::where"),
    "element-wise": ("aten::mul", "aten::add", "aten::silu", "aten::gelu", "aten::rsqrt", "aten::pow", "aten::mean",
                     "aten::neg", "aten::cat", "aten::sub", "aten::div", "aten::exp", "aten::cos", "aten::sin"),
    "copies": ("aten::copy_", "aten::to", "aten::clone", "aten::contiguous", "aten::_to_copy", "aten::empty"),
}


def kind_of(name: str) -> str:
    for kind, fragments in KINDS.items():
        if any(f in name for f in fragments):
            return kind
    return "other"


def profile_case(model, case: str, inputs: dict, gc) -> tuple[float, dict[str, float], int]:
    """(wall ms of one prefill, self CPU ms per kind, scoring calls) for ``case``."""
    spec = None if case == "stock" else parse_spec(case)
    run = api.apply(model, spec.name, profile=True, **spec.options) if spec else None
    try:
        model.generate(**inputs, generation_config=gc)  # warm-up
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
            t0 = time.perf_counter()
            model.generate(**inputs, generation_config=gc)
            wall = (time.perf_counter() - t0) * 1000.0
    finally:
        if run is not None:
            run.detach()
    kinds: dict[str, float] = collections.defaultdict(float)
    for event in prof.key_averages():
        kinds[kind_of(event.key)] += event.self_cpu_time_total / 1000.0
    scored = len(run.profile.scoring) // 2 if run is not None and run.profile is not None else 0
    return wall, dict(kinds), scored


def layer_rate(model, tokens: int, repeats: int, masked: bool = False) -> tuple[float, float]:
    """(ms, GFLOP/s) of one decoder layer's forward over ``tokens`` tokens (causal SDPA, no cache; with
    ``masked`` an explicit [1, 1, n, n] boolean mask, as a layer of packed paths gets)."""
    layer = model.model.language_model.layers[0]
    cfg = model.config.text_config
    d, m, heads = cfg.hidden_size, cfg.intermediate_size, cfg.num_attention_heads
    kv = getattr(cfg, "num_key_value_heads", heads)
    hd = d // heads
    x = torch.randn(1, tokens, d, dtype=model.dtype)
    pos = torch.arange(tokens)[None]
    pe = model.model.language_model.rotary_emb(x, pos)
    flops = 2 * tokens * d * (2 * d + 2 * kv * hd) + 2 * tokens * tokens * d + 6 * tokens * d * m
    mask = torch.ones(tokens, tokens, dtype=torch.bool).tril()[None, None] if masked else None
    times = []
    with torch.no_grad():
        layer(x, attention_mask=mask, position_embeddings=pe, position_ids=pos)
        for _ in range(repeats):
            t0 = time.perf_counter()
            layer(x, attention_mask=mask, position_embeddings=pe, position_ids=pos)
            times.append(time.perf_counter() - t0)
    best = min(times)
    return best * 1000.0, flops / best / 1e9


def runs_of(counts: list) -> str:
    """``[636, 636, 124]`` -> ``"636 x2, 124"``."""
    out: list[list] = []
    for c in counts:
        if out and out[-1][0] == c:
            out[-1][1] += 1
        else:
            out.append([c, 1])
    return ", ".join(f"{c} x{n}" if n > 1 else f"{c}" for c, n in out)


def predict_from_layers(model, bench: dict, inputs: dict, gc, repeats: int) -> list[str]:
    """Markdown rows: every case of ``bench`` (a ``vtprune bench`` result) with its TTFT beside the TTFT its
    layers' sizes predict (module docstring). Both are measured here, in one stretch, so that the machine's
    drift between runs does not enter the comparison: the TTFTs round-robin over the cases (median of
    ``repeats`` rounds), the layer sizes round-robin too (best of ``repeats``)."""
    names = [c["name"] for c in bench["cases"]]
    roofline = {c["name"]: c.get("speedup", {}).get("roofline_ideal", {}).get("prefill") for c in bench["cases"]}
    n_layers = model.config.text_config.num_hidden_layers
    sizes: dict[str, list[tuple[int, bool]]] = {"stock": [(inputs["input_ids"].shape[1], False)] * n_layers}
    runs: dict[str, Any] = {"stock": None}
    for name in names:
        if name == "stock":
            continue
        spec = parse_spec(name)
        runs[name] = api.apply(model, spec.name, **spec.options)
        try:
            model.generate(**inputs, generation_config=gc)  # untimed: the layer sizes, and a warm-up
            sample = runs[name].report()["samples"][0]
        finally:
            runs[name].detach()
        sizes[name] = [(n, p > 1) for n, p in zip(sample["tokens_per_layer_prefill"], sample["paths_per_layer_prefill"],
                                                  strict=True)]
    ttft: dict[str, list[float]] = {name: [] for name in runs}
    for _ in range(repeats):
        for name, run in runs.items():
            if run is not None:
                run.attach()
            try:
                t0 = time.perf_counter()
                model.generate(**inputs, generation_config=gc)
                ttft[name].append((time.perf_counter() - t0) * 1000.0)
            finally:
                if run is not None:
                    run.detach()
    layer_ms: dict[tuple[int, bool], float] = {}
    keys = sorted({key for layers in sizes.values() for key in layers}, reverse=True)
    for _ in range(repeats):
        for key in keys:
            ms = layer_rate(model, key[0], 1, masked=key[1])[0]
            layer_ms[key] = min(ms, layer_ms.get(key, ms))
    measured = {name: measure.median(ts) for name, ts in ttft.items()}
    stock = measured["stock"]
    rest = stock - sum(layer_ms[key] for key in sizes["stock"])
    rows = ["| case | tokens per layer (prefill) | TTFT ms measured | predicted from layer times | measured / predicted speedup "
            "| speedup measured | predicted | roofline-ideal (bench) | measured / roofline |", "|---|---|---|---|---|---|---|---|---|"]
    for name in runs:
        if name == "stock":
            continue
        predicted = rest + sum(layer_ms[key] for key in sizes[name])
        shown = runs_of([f"{n} (2 paths)" if packed else n for n, packed in sizes[name]])
        ideal = roofline.get(name)
        rows.append(f"| {name} | {shown} | {measured[name]:.0f} | {predicted:.0f} | {predicted / measured[name]:.2f} | "
                    f"{stock / measured[name]:.2f}x | {stock / predicted:.2f}x | "
                    + (f"{ideal:.2f}x | {stock / measured[name] / ideal:.2f} |" if ideal else "- | - |"))
    rows += ["", f"Stock's TTFT here: {stock:.0f} ms (median of {repeats} rounds), of which outside its decoder layers "
             f"(vision tower, embedding, LM head, sampling) {rest:.0f} ms, taken as every case's.", "",
             "Decoder layer alone, ms (best of the rounds):", "",
             "| tokens | causal kernel | explicit mask (packed paths) |", "|---|---|---|"]
    for n in sorted({n for n, _ in layer_ms}, reverse=True):
        rows.append(f"| {n} | " + " | ".join(f"{layer_ms[(n, m)]:.1f}" if (n, m) in layer_ms else "-"
                                              for m in (False, True)) + " |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="llava-1.5-7b", choices=sorted(archs.ARCHS))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--cases", default="stock,none,parvts@64,st3@64,fastv@64")
    p.add_argument("--layer-tokens", default="636,336,256,192,124")
    p.add_argument("--prompt-tokens", type=int, default=60)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bench", default=None, help="a vtprune bench JSON: predict its cases' TTFT from layer timings")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    model = archs.build_model(args.arch, dtype, "cpu", "sdpa", 0)
    inputs = synthetic_inputs(model, 1, args.prompt_tokens, 0, "cpu")
    gc = generation_config(model, 1)
    rate = measure.matmul_rate("cpu", dtype, None, 5)["flops_per_s"]
    lines = [f"# Prefill profile: {args.arch}, {args.dtype}, {inputs['input_ids'].shape[1]} prompt tokens",
             "", f"{datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}, {platform.processor() or 'cpu'}, "
             f"{os.cpu_count()} logical cores, torch {torch.__version__}, square-matmul peak {rate / 1e9:.0f} GFLOP/s",
             f"`python scripts/profile_prefill.py --arch {args.arch} --dtype {args.dtype} --cases {args.cases} "
             f"--layer-tokens {args.layer_tokens}`", ""]
    if args.bench:
        bench = json.loads(Path(args.bench).read_text())
        lines[3] = f"`python scripts/profile_prefill.py --arch {args.arch} --dtype {args.dtype} --bench {args.bench}`"
        lines += [f"Prediction of `{args.bench}` ({bench['meta'].get('date', '?')}) from layer timings:", "",
                  *predict_from_layers(model, bench, inputs, gc, args.repeats)]
        return emit(lines, args.out)
    cases = [c.strip() for c in args.cases.split(",") if c.strip()]
    results = {c: profile_case(model, c, inputs, gc) for c in cases}
    kinds = sorted({k for _, ks, _ in results.values() for k in ks}, key=lambda k: -results[cases[0]][1].get(k, 0))
    lines.append("| case | prefill ms (profiled) | " + " | ".join(f"{k} ms" for k in kinds) + " | scored layers |")
    lines.append("|---|---|" + "---|" * len(kinds) + "---|")
    for case, (wall, ks, scored) in results.items():
        lines.append(f"| {case} | {wall:.0f} | " + " | ".join(f"{ks.get(k, 0.0):.0f}" for k in kinds) + f" | {scored} |")
    lines += ["", "One decoder layer alone (best of the repeats), causal SDPA:", "",
              "| tokens | ms | GFLOP/s | share of the square-matmul peak |", "|---|---|---|---|"]
    for n in (int(t) for t in args.layer_tokens.split(",")):
        ms, gflops = layer_rate(model, n, args.repeats)
        lines.append(f"| {n} | {ms:.1f} | {gflops:.0f} | {gflops * 1e9 / rate:.2f} |")
    emit(lines, args.out)


def emit(lines: list[str], out: str | None) -> None:
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)


if __name__ == "__main__":
    main()
