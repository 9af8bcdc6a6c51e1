#!/usr/bin/env python
"""Keeping some KV-cache entries: ``torch.gather`` with an index expanded over heads and head_dim against
``vtprune.engine.layout.take`` (one ``index_select``), on cache-sized tensors.

The engine evicts visual entries from a layer's KV cache (ST³'s annealing) and gathers kept tokens' hidden
states in the prefill; this measures the two ways of doing it on this machine and checks they agree.

Usage: ``python scripts/bench_kv_select.py [--dtype bfloat16] [--repeats 200] [--out OUT.md]``
"""

from __future__ import annotations

import argparse
import datetime
import functools
import os
import platform
import time
from pathlib import Path

import torch

from vtprune.engine.layout import take

SHAPES = ((1, 16, 520, 64), (1, 3, 230, 64), (1, 32, 300, 128), (16, 16, 520, 64), (4, 32, 300, 128))


def per_call_us(fn, repeats: int) -> float:
    fn()
    t0 = time.perf_counter()
    for _ in range(repeats):
        fn()
    return (time.perf_counter() - t0) / repeats * 1e6


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--dtype", default="bfloat16")
    p.add_argument("--repeats", type=int, default=200)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    dtype = getattr(torch, args.dtype)
    g = torch.Generator().manual_seed(0)
    lines = [f"# KV entries kept: torch.gather vs engine.layout.take ({args.dtype})", "",
             f"{datetime.datetime.now(datetime.UTC).isoformat(timespec='seconds')}, {platform.processor() or 'cpu'}, "
             f"{os.cpu_count()} logical cores, torch {torch.__version__}, {torch.get_num_threads()} threads; "
             f"`python scripts/bench_kv_select.py --dtype {args.dtype} --repeats {args.repeats}`", "",
             "| cache [B, heads, entries, head_dim] | entries kept | gather µs | take µs | gather / take |",
             "|---|---|---|---|---|"]
    for b, h, n, d in SHAPES:
        x = torch.randn(b, h, n, d, generator=g).to(dtype)
        m = n * 3 // 4
        slots = torch.stack([torch.randperm(n, generator=g)[:m].sort().values for _ in range(b)])
        idx = slots[:, None, :, None].expand(-1, h, -1, d)
        if not torch.equal(torch.gather(x, 2, idx), take(x, slots, 2)):
            raise SystemExit(f"take disagrees with gather at {(b, h, n, d)}")
        t_gather = per_call_us(functools.partial(torch.gather, x, 2, idx), args.repeats)
        t_take = per_call_us(functools.partial(take, x, slots, 2), args.repeats)
        lines.append(f"| {[b, h, n, d]} | {m} | {t_gather:.0f} | {t_take:.0f} | {t_gather / t_take:.1f}x |")
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
