"""The ledger: tokens per layer -> equivalent budget, analytic FLOPs, KV-cache bytes, timings.

Counts come from the sequences and caches the run actually built, per sample (padding excluded), for
the prefill and for every decode step, and are compared with the same quantities for the unpruned
model on the same input. FLOPs cover the decoder layers only (the vision tower and the LM head are
unchanged by every method). Two conventions:

- ``fastv``: FastV's per-layer count ``F(n) = 4 n d^2 + 2 n^2 d + 2 n d m`` (Chen et al., ECCV 2024),
  generalised to ``F(q, kv) = 4 q d^2 + 2 q kv d + 2 q d m`` for q queries against kv keys (a decode
  step is ``F(1, kv)``); two packed paths count as ``F(n_A) + F(n_B)`` (METHODS.md).
- ``exact``: multiply-adds x 2 of the real architecture: q / k / v / o projections with grouped-query
  attention, SwiGLU MLP (3 matrices), and QK^T + AV over the (query, key) pairs actually attended
  (causal, per path).
"""

from __future__ import annotations

import time
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Dims:
    """Decoder dimensions: hidden d, MLP m, heads, kv heads, head dim, layers."""

    d: int
    m: int
    heads: int
    kv_heads: int
    head_dim: int
    layers: int

    @classmethod
    def from_config(cls, cfg) -> Dims:
        heads = cfg.num_attention_heads
        head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // heads
        return cls(cfg.hidden_size, cfg.intermediate_size, heads,
                   getattr(cfg, "num_key_value_heads", None) or heads, head_dim, cfg.num_hidden_layers)

    def fastv(self, q: int, kv: int) -> int:
        """FastV-convention FLOPs of one layer for q queries against kv keys."""
        return 4 * q * self.d**2 + 2 * q * kv * self.d + 2 * q * self.d * self.m

    def exact(self, q: int, pairs: int) -> int:
        """FLOPs of one layer for q queries attending ``pairs`` (query, key) pairs in total."""
        attn_w = self.heads * self.head_dim
        proj = 2 * q * self.d * attn_w * 2 + 2 * q * self.d * self.kv_heads * self.head_dim * 2
        return proj + 4 * pairs * attn_w + 6 * q * self.d * self.m


class Timer:
    """Wall-clock intervals in ms; CUDA events on GPU (read at report time, no sync in the loop)."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"
        self.spans: list[tuple] = []
        self._open: torch.cuda.Event | float | None = None  # the open span's start

    def start(self) -> None:
        if self.cuda:
            self._open = torch.cuda.Event(enable_timing=True)
            self._open.record()
        else:
            self._open = time.perf_counter()

    def stop(self) -> None:
        if self._open is None:
            return
        if self.cuda:
            end = torch.cuda.Event(enable_timing=True)
            end.record()
            self.spans.append((self._open, end))
        else:
            self.spans.append((self._open, time.perf_counter()))
        self._open = None

    def ms(self) -> list[float]:
        if self.cuda and self.spans:
            torch.cuda.synchronize()
            return [a.elapsed_time(b) for a, b in self.spans]
        return [(b - a) * 1000.0 for a, b in self.spans]


class Ledger:
    """Per-sample work of one generation: the run records each prefill layer and, after each decode
    step, the visual tokens in every layer's cache; decode work is derived from those at report time
    (nothing is counted per layer inside the decode loop)."""

    def __init__(self, dims: Dims, pads: list[int], prompt_length: int, n_images: int, n_visual: int,
                 context: list[list[int]] | None = None, context_unpruned: list[int] | None = None,
                 context_pads: list[int] | None = None, kinds: tuple[str, ...] | None = None):
        """``prompt_length`` tokens (padded) of this call's prompt, ``pads`` its padding per sample; for a later
        turn on a cache (:mod:`vtprune.engine.conversation`) ``context[l][b]`` the earlier turns' entries in
        layer l's cache for sample b and ``context_unpruned[b]`` the earlier turns' tokens (what the stock
        cache holds): they add keys to every query of this call, pruned and unpruned alike. ``kinds``: each
        of the ``n_images`` visual units' kind (``"image"`` / ``"video"``; default all images)."""
        self.dims, self.pads, self.prompt_length = dims, pads, prompt_length
        self.n_images, self.n_visual = n_images, n_visual
        self.kinds = tuple(kinds) if kinds is not None else ("image",) * n_images
        b = len(pads)
        self.context = context or [[0] * b for _ in range(dims.layers)]
        self.context_unpruned = context_unpruned or [0] * b
        self.context_pads = context_pads or [0] * b
        self.prefill_fastv, self.prefill_exact = [0] * b, [0] * b
        self.prefill_visual: list[list[int]] = [[] for _ in range(b)]  # per sample, per layer
        self.prefill_tokens: list[list[int]] = [[] for _ in range(b)]  # per sample, per layer: real tokens, all paths
        self.prefill_paths: list[list[int]] = [[] for _ in range(b)]  # per sample, per layer: 1, or 2 packed paths
        self.decode_history: list[list[int]] = []  # per decode step, visual tokens per layer (all images)

    @property
    def steps(self) -> int:
        """Decode steps so far (tokens fed back)."""
        return len(self.decode_history)

    @property
    def decode_visual(self) -> list[int]:
        """Visual tokens per layer at the last decode step (empty before any)."""
        return self.decode_history[-1] if self.decode_history else []

    def prefill_layer(self, counts: list[tuple[int, int, int]], visual: list[int]) -> None:
        """Record one prefill layer: per sample (shared prefix, path-1 tail, path-2 tail) real tokens
        (a single path is (n, 0, 0)) and visual tokens present."""
        for b, (p, a, c) in enumerate(counts):
            ctx = self.context[len(self.prefill_tokens[b])][b]  # earlier turns' keys of this layer
            pairs = p * (p + 1) // 2 + a * p + a * (a + 1) // 2 + c * p + c * (c + 1) // 2 + (p + a + c) * ctx
            self.prefill_exact[b] += self.dims.exact(p + a + c, pairs)
            self.prefill_fastv[b] += (self.dims.fastv(p + a, ctx + p + a)
                                      + (self.dims.fastv(p + c, ctx + p + c) if c else 0))
            self.prefill_visual[b].append(visual[b])
            self.prefill_tokens[b].append(p + a + c)
            self.prefill_paths[b].append(2 if c else 1)

    def decode_step(self, visual: list[int]) -> None:
        """Record one decode step: visual tokens (all images) in each layer's cache during it."""
        self.decode_history.append(list(visual))

    def _decode_flops(self, b: int) -> tuple[int, int]:
        """(FastV, exact) FLOPs of all decode steps of sample ``b``. At step t layer l's cache holds the
        earlier turns' entries, the prompt's text tokens, its visual tokens and the t tokens fed back."""
        text = self.prompt_length - self.n_images * self.n_visual - self.pads[b]
        fastv = exact = 0
        for t, visual in enumerate(self.decode_history, start=1):
            for layer, v in enumerate(visual):
                kv = self.context[layer][b] + text + v + t
                fastv += self.dims.fastv(1, kv)
                exact += self.dims.exact(1, kv)
        return fastv, exact

    def summary(self, kv_bytes_per_token: int, cache_lengths: list[int]) -> list[dict]:
        """Per-sample report dicts (see :meth:`vtprune.engine.run.Run.report`)."""
        dims, out = self.dims, []
        for b, pad in enumerate(self.pads):
            n0, c0 = self.prompt_length - pad, self.context_unpruned[b]
            base_prefill_f = dims.layers * dims.fastv(n0, c0 + n0)
            base_prefill_e = dims.layers * dims.exact(n0, n0 * (n0 + 1) // 2 + n0 * c0)
            base_dec_f = sum(dims.layers * dims.fastv(1, c0 + n0 + j) for j in range(1, self.steps + 1))
            base_dec_e = sum(dims.layers * dims.exact(1, c0 + n0 + j) for j in range(1, self.steps + 1))
            kv_entries = sum(n - pad - self.context_pads[b] for n in cache_lengths)
            kv_entries0 = dims.layers * (c0 + n0 + self.steps)
            vis = self.prefill_visual[b]
            videos = self.kinds.count("video")
            decode_f, decode_e = self._decode_flops(b)
            total_f = self.prefill_fastv[b] + decode_f
            total_f0 = base_prefill_f + base_dec_f
            out.append({
                "visual_tokens_in": self.n_images * self.n_visual,
                "prompt_tokens": n0,
                "visual_tokens_per_layer_prefill": vis,
                # every unit keeps the same number of tokens ([B, I, n]): a kind's share is its units' share
                "visual_kinds": list(self.kinds),
                "video_tokens_per_layer_prefill": [v * videos // self.n_images for v in vis] if videos else [0] * len(vis),
                "visual_tokens_per_layer_last_decode": list(self.decode_visual) or list(vis),
                "tokens_per_layer_prefill": list(self.prefill_tokens[b]),
                "paths_per_layer_prefill": list(self.prefill_paths[b]),
                # a text-only prompt has no visual token: 0
                "equivalent_budget": sum(vis) / len(vis) / self.n_images if vis and self.n_images else float(self.n_visual),
                "final_budget": vis[-1] / self.n_images if vis and self.n_images else self.n_visual,
                "flops": {
                    "prefill": _pair(self.prefill_fastv[b], base_prefill_f, self.prefill_exact[b], base_prefill_e),
                    "decode": _pair(decode_f, base_dec_f, decode_e, base_dec_e),
                    "total_fastv_ratio": total_f / total_f0 if total_f0 else 1.0,
                },
                "kv_cache": {"bytes": kv_entries * kv_bytes_per_token, "bytes_unpruned": kv_entries0 * kv_bytes_per_token,
                             "ratio": kv_entries / kv_entries0},
            })
        return out


def _pair(f, f0, e, e0) -> dict:
    return {"fastv": f, "fastv_unpruned": f0, "fastv_ratio": f / f0 if f0 else 1.0,
            "exact": e, "exact_unpruned": e0, "exact_ratio": e / e0 if e0 else 1.0}
