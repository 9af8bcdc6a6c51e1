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
instead accounts for every case's TTFT with every decoder layer timed inside the model's own prefill
(``LayerTimer``: the layer's forward wrapped, vtprune's pre-hooks outside it): the time in the layers
at stock's own layer rate (GFLOP/s of stock's layers in the same rounds), the layers' extra time at the
sizes the case leaves them (kernel rate), the scoring calls, and the time outside the layers against
stock's. A case whose layers' extra time dominates its gap is capped by kernel sizes; a case whose
outside time or scoring grows, by vtprune. (It replaced a prediction from one layer timed alone, which
two runs on the 2-core VM could not reproduce, 2026-12-02.)::

    python scripts/profile_prefill.py --arch llava-1.5-7b --dtype bfloat16 \\
        --bench benchmarks/results/.../bench-b1-p60-n1-bfloat16.json --repeats 3 --out OUT.md
"""

from __future__ import annotations

import argparse
import collections
import contextlib
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
from vtprune.engine.ledger import Dims
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


DEFAULT_CASES = "stock,none,parvts@64,st3@64,fastv@64"


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


def layer_rate(model, tokens: int, repeats: int) -> tuple[float, float]:
    """(ms, GFLOP/s) of one decoder layer's forward over ``tokens`` tokens (causal SDPA, no cache), FLOPs
    in the ledger's exact convention with causal pairs."""
    layer = model.model.language_model.layers[0]
    cfg = model.config.text_config
    x = torch.randn(1, tokens, cfg.hidden_size, dtype=model.dtype)
    pos = torch.arange(tokens)[None]
    pe = model.model.language_model.rotary_emb(x, pos)
    flops = Dims.from_config(cfg).exact(tokens, tokens * (tokens + 1) // 2)
    times = []
    with torch.no_grad():
        layer(x, attention_mask=None, position_embeddings=pe, position_ids=pos)
        for _ in range(repeats):
            t0 = time.perf_counter()
            layer(x, attention_mask=None, position_embeddings=pe, position_ids=pos)
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


class LayerTimer:
    """Wall time of every decoder layer's own forward inside the model (its pre-hooks, vtprune's
    included, run outside it), with the tokens its hidden states hold: the layer instance's ``forward``
    is wrapped while the timer is on and restored after."""

    def __init__(self, layers):
        self.layers = list(layers)
        self.calls: list[tuple[int, int, float]] = []  # (layer index, tokens, ms), in call order

    def __enter__(self) -> LayerTimer:
        self.calls.clear()
        for i, layer in enumerate(self.layers):
            layer.forward = self._timed(i, layer.forward)
        return self

    def __exit__(self, *exc) -> None:
        for layer in self.layers:
            del layer.forward  # the instance attribute; the class's forward shows through again

    def _timed(self, index: int, forward):
        def wrapper(hidden_states, *args, **kwargs):
            t0 = time.perf_counter()
            try:
                return forward(hidden_states, *args, **kwargs)
            finally:
                self.calls.append((index, hidden_states.shape[1], (time.perf_counter() - t0) * 1000.0))
        return wrapper


def _ttft(model, run, inputs: dict, gc, around) -> float:
    """ms of one ``generate`` with ``run`` attached (None: stock), inside the context ``around``."""
    if run is not None:
        run.attach()
    try:
        with around:
            t0 = time.perf_counter()
            model.generate(**inputs, generation_config=gc)
            return (time.perf_counter() - t0) * 1000.0
    finally:
        if run is not None:
            run.detach()


def account_in_model(model, bench: dict, inputs: dict, gc, repeats: int) -> list[str]:
    """Markdown: every case of ``bench`` (a ``vtprune bench`` result), its TTFT and where that time goes,
    every decoder layer timed inside the model's own prefill (module docstring).

    Round-robin over the cases, ``repeats`` rounds; in each round every case runs twice, once plain (its
    TTFT, the run attached as ``vtprune bench`` attaches it) and once with :class:`LayerTimer` on and a
    second run of the same method with ``profile=True`` (its layers' times, its scoring calls' time):
    medians over the rounds. The layer time is split with stock's own layer rate (FLOPs / ms of stock's
    layers, measured in the same rounds) into the work at stock's rate and the rest
    (``kernel rate``); scoring (``row_logits``, inside the scored layers' attention) is taken out of the
    layers; what is outside every layer (vision tower, embedding, LM head, vtprune's pre-hooks and
    wrapper) is compared with stock's."""
    dims = Dims.from_config(model.config.text_config)

    def layer_flops(tokens: int) -> int:  # every (query, key) pair: what SDPA computes with an explicit mask
        return dims.exact(tokens, tokens * tokens)

    layers = model.model.language_model.layers
    names = [c["name"] for c in bench["cases"]]
    roofline = {c["name"]: c.get("speedup", {}).get("roofline_ideal", {}).get("prefill") for c in bench["cases"]}
    runs: dict[str, Any] = {"stock": None}  # attached for the plain TTFT: as vtprune bench runs them
    profiled: dict[str, Any] = {"stock": None}  # attached with the timer: profile=True, its scoring calls timed
    for name in names:
        if name != "stock":
            spec = parse_spec(name)
            for held, profile in ((runs, False), (profiled, True)):
                held[name] = api.apply(model, spec.name, profile=profile, **spec.options)
                held[name].detach()
    plain: dict[str, list[float]] = {n: [] for n in runs}
    timed: dict[str, list[float]] = {n: [] for n in runs}
    layer_ms: dict[str, list[float]] = {n: [] for n in runs}
    scoring_ms: dict[str, list[float]] = {n: [] for n in runs}
    work: dict[str, list[tuple[int, int, float]]] = {}
    timer = LayerTimer(layers)
    with torch.no_grad():
        for run in runs.values():  # warm-up, untimed
            _ttft(model, run, inputs, gc, contextlib.nullcontext())
        for _ in range(repeats):
            for name, run in runs.items():
                plain[name].append(_ttft(model, run, inputs, gc, contextlib.nullcontext()))
                watched = profiled[name]
                if watched is not None:
                    watched.profile.reset()
                timed[name].append(_ttft(model, watched, inputs, gc, timer))
                calls = [c for c in timer.calls if c[1] > 1]  # the prefill's calls (decode: 1 token)
                layer_ms[name].append(sum(c[2] for c in calls))
                scoring_ms[name].append(sum(t for rows, t in watched.profile.scoring if rows > 1) if watched else 0.0)
                work[name] = calls
    med = {k: {n: measure.median(v) for n, v in d.items()} for k, d in
           (("plain", plain), ("timed", timed), ("layers", layer_ms), ("scoring", scoring_ms))}
    stock_flops = sum(layer_flops(n) for _, n, _ in work["stock"])
    stock_rate = stock_flops / med["layers"]["stock"]  # FLOPs per ms
    stock_rest = med["timed"]["stock"] - med["layers"]["stock"]
    stock = med["plain"]["stock"]
    rows = ["| case | tokens per layer (prefill, as run) | TTFT ms | with layer timer | outside the layers | "
            "layers at stock's rate | layers' kernel rate (extra) | scoring | speedup measured | at stock's layer rate, "
            "nothing else | roofline-ideal (bench) | measured / roofline |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name in runs:
        calls = work[name]
        flops = sum(layer_flops(n) for _, n, _ in calls)
        at_rate = flops / stock_rate
        layer_only = med["layers"][name] - med["scoring"][name]
        rest = med["timed"][name] - med["layers"][name]
        ideal = roofline.get(name)
        rows.append(f"| {name} | {runs_of([n for _, n, _ in calls])} | {med['plain'][name]:.0f} | "
                    f"{med['timed'][name]:.0f} | {rest:.0f} ({rest - stock_rest:+.0f}) | {at_rate:.0f} | "
                    f"{layer_only - at_rate:+.0f} | {med['scoring'][name]:.0f} | {stock / med['plain'][name]:.2f}x | "
                    f"{med['timed']['stock'] / (stock_rest + at_rate):.2f}x | "
                    + (f"{ideal:.2f}x | {stock / med['plain'][name] / ideal:.2f} |" if ideal else "- | - |"))
    rows += ["", f"Medians of {repeats} rounds. Stock's decoder layers: {stock_flops / 1e9:.0f} GFLOP in "
             f"{med['layers']['stock']:.0f} ms, {stock_rate / 1e6:.0f} GFLOP/s; outside them {stock_rest:.0f} ms. "
             "Columns in ms: *outside the layers* = TTFT with the timer minus the layers' time (in brackets: minus "
             "stock's); *layers at stock's rate* = the FLOPs the case's layers do (as run: packed paths' masked "
             "attention counted whole) at stock's layer rate; *kernel rate (extra)* = the layers' time, scoring "
             "taken out, minus that; *at stock's layer rate, nothing else* = stock's TTFT over stock's outside "
             "time plus the layers at stock's rate.", "",
             "Layer rate by size (every prefill layer call of every case, median ms per size):", "",
             "| tokens | calls | ms | GFLOP/s | of stock's layer rate |", "|---|---|---|---|---|"]
    by_size: dict[int, list[float]] = collections.defaultdict(list)
    for calls in work.values():
        for _, n, ms in calls:
            by_size[n].append(ms)
    for n in sorted(by_size, reverse=True):
        ms = measure.median(by_size[n])
        rate = layer_flops(n) / ms
        rows.append(f"| {n} | {len(by_size[n])} | {ms:.1f} | {rate / 1e6:.0f} | {rate / stock_rate:.2f} |")
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", default="llava-1.5-7b", choices=sorted(archs.ARCHS))
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--cases", default=None, help=f"comma-separated cases (default {DEFAULT_CASES}; "
                   "with --bench: a subset of the bench's cases, default all of them)")
    p.add_argument("--layer-tokens", default="636,336,256,192,124")
    p.add_argument("--prompt-tokens", type=int, default=60)
    p.add_argument("--repeats", type=int, default=5)
    p.add_argument("--bench", default=None, help="a vtprune bench JSON: predict its cases' TTFT from layer timings")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    bench = json.loads(Path(args.bench).read_text()) if args.bench else None
    if bench and args.cases:  # before the model is built: a 7B takes minutes
        bench["cases"] = select_cases(bench["cases"], args.cases)
    dtype = getattr(torch, args.dtype)
    model = archs.build_model(args.arch, dtype, "cpu", "sdpa", 0)
    inputs = synthetic_inputs(model, 1, args.prompt_tokens, 0, "cpu")
    gc = generation_config(model, 1)
    rate = measure.matmul_rate("cpu", dtype, None, 5)["flops_per_s"]
    lines = [f"# Prefill profile: {args.arch}, {args.dtype}, {inputs['input_ids'].shape[1]} prompt tokens",
             "", f"{datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}, {platform.processor() or 'cpu'}, "
             f"{os.cpu_count()} logical cores, torch {torch.__version__}, square-matmul peak {rate / 1e9:.0f} GFLOP/s",
             f"`python scripts/profile_prefill.py --arch {args.arch} --dtype {args.dtype} --cases {args.cases or DEFAULT_CASES} "
             f"--layer-tokens {args.layer_tokens} --repeats {args.repeats}`", ""]
    if bench:
        lines[3] = (f"`python scripts/profile_prefill.py --arch {args.arch} --dtype {args.dtype} --bench {args.bench} "
                    + (f"--cases {args.cases} " if args.cases else "") + f"--repeats {args.repeats}`")
        lines += [f"Where the TTFT of `{args.bench}`'s cases ({bench['meta'].get('date', '?')}) goes, layers timed in the model:", "",
                  *account_in_model(model, bench, inputs, gc, args.repeats)]
        return emit(lines, args.out)
    cases = split_cases(args.cases or DEFAULT_CASES)
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


def split_cases(text: str) -> list[str]:
    return [c.strip() for c in text.split(",") if c.strip()]


def select_cases(cases: list[dict], text: str) -> list[dict]:
    """The bench's cases named in ``text`` (comma-separated), in the bench's order, stock always kept (every
    figure is against it); SystemExit naming the cases the bench has when one is not among them."""
    wanted = split_cases(text)
    have = [c["name"] for c in cases]
    missing = [w for w in wanted if w not in have]
    if missing:
        raise SystemExit(f"--cases {','.join(missing)}: not in the bench JSON, which has {','.join(have)}")
    return [c for c in cases if c["name"] == "stock" or c["name"] in wanted]


def emit(lines: list[str], out: str | None) -> None:
    text = "\n".join(lines) + "\n"
    print(text)
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(text)


if __name__ == "__main__":
    main()
